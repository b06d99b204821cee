import json

import pytest
import torch

from qtool.calibrate.data import calibration_windows, fingerprint, load_text, tokenize
from qtool.errors import QtoolError


def test_text_files_of_every_kind_are_read(tmp_path):
    (tmp_path / "a.txt").write_text("plain text", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first", "second"]}), tmp_path / "c.parquet")
    assert load_text(str(tmp_path / "a.txt")) == "plain text"
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    assert load_text(str(tmp_path / "c.parquet")) == "first\n\nsecond"


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(QtoolError, match=r"bad.jsonl:2: not valid JSON"):
        load_text(str(path))
    path.write_text('{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(QtoolError, match=r"bad.jsonl:1: each line needs a string field 'text'"):
        load_text(str(path))


def test_parquet_without_text_column_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(QtoolError, match="has no 'text' column"):
        load_text(str(tmp_path / "c.parquet"))


def test_corrupt_or_missing_files_are_clear_errors(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(QtoolError, match="cannot read data file"):
        load_text(str(tmp_path / "broken.parquet"))
    with pytest.raises(QtoolError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(QtoolError, match="cannot read data file"):
        load_text(str(tmp_path / "latin1.txt"))


def test_unknown_source_lists_the_named_ones():
    with pytest.raises(QtoolError, match="unknown data source 'c5'; use one of wiki-leads, wikitext2"):
        load_text("c5")


def test_wikitext_offline_without_the_file_says_where_to_put_it(tmp_path):
    with pytest.raises(QtoolError, match="wikitext2 is not on disk .* --data-dir"):
        load_text("wikitext", tmp_path)


def test_wikitext_is_read_from_the_data_dir(tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Title = \n text", encoding="utf-8")
    assert load_text("wikitext2", tmp_path) == " = Title = \n text"


def test_wiki_leads_comes_from_the_installed_package():
    text = load_text("wiki-leads")
    assert len(text) > 4_000_000
    assert "20th-century classical music" in text


def test_calibration_windows_are_deterministic_for_a_seed():
    tokens = torch.arange(10_000)
    first = calibration_windows(tokens, 8, 64, seed=3)
    assert first.shape == (8, 64)
    assert torch.equal(first, calibration_windows(tokens, 8, 64, seed=3))
    assert not torch.equal(first, calibration_windows(tokens, 8, 64, seed=4))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 64)) for row in first)
    assert fingerprint(first) == fingerprint(first.clone()) != fingerprint(calibration_windows(tokens, 8, 64, seed=4))


def test_too_little_text_for_one_window_is_an_error():
    with pytest.raises(QtoolError, match="fewer than one window"):
        calibration_windows(torch.arange(10), 1, 64, seed=0)


def test_tokenize_adds_no_special_tokens(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tokenize(tokenizer, "The cat sat.")
    assert ids.dtype == torch.long
    assert tokenizer.bos_token_id not in ids.tolist()
    assert tokenizer.decode(ids) == "The cat sat."


def test_tokenized_texts_are_cached_by_text_and_tokenizer(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from safetensors.torch import save_file

    monkeypatch.setenv("QTOOL_CACHE_DIR", str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fresh = tokenize(tokenizer, "The cat sat on the mat.")
    files = list((tmp_path / "tokens").iterdir())
    assert len(files) == 1 and torch.equal(tokenize(tokenizer, "The cat sat on the mat."), fresh)
    save_file({"ids": torch.tensor([7, 8, 9], dtype=torch.int32)}, files[0])  # what the cache holds is what is read
    assert tokenize(tokenizer, "The cat sat on the mat.").tolist() == [7, 8, 9]
    assert torch.equal(tokenize(tokenizer, "The dog sat."), tokenize(tokenizer, "The dog sat."))
    assert len(list((tmp_path / "tokens").iterdir())) == 2
