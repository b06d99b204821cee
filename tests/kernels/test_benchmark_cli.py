"""benchmarks/kernels.py refuses bad input before touching a GPU: one message, exit status 2, and
no results written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("shape, message", [("4096", "is not INxOUT"), ("4096x14336x2", "is not INxOUT"),
                                            ("0x4096", "has a size below 1")])
def test_a_bad_shape_is_refused(shape, message, tmp_path):
    result = run("--shapes", shape, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [(["--loads", "32x128x256"], "is not REQUESTSxPROMPTxOUTPUTxSEED"),
                                           (["--loads", "0x128x256x1"], "has a count below 1"),
                                           (["--max-batched-tokens", "64"], "at least the longest prompt")])
def test_load_buckets_refuses_bad_loads(args, message):
    result = subprocess.run([sys.executable, str(SCRIPT.with_name("load_buckets.py")), *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr.splitlines()[-1] and not result.stdout


def test_merge_refuses_unreadable_and_foreign_json(tmp_path):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"rows": []}))
    for path, message in ((tmp_path / "missing.json", "cannot read"), (foreign, "lacks")):
        result = run("--merge", str(path), "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, args, message", [
    ("decode_ab.py", ["--batch-sizes", "1", "0"], "--batch-sizes must be at least 1"),
    ("decode_ab.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("decode_ab.py", ["--output-len", "1"], "--output-len must be at least 2"),
    ("decode_ab.py", ["--synthetic", "no-such-preset"], "--synthetic takes a preset"),
    ("step_drift.py", ["--after", "32", "0"], "is not a request count or REQUESTSxPROMPTxOUTPUT"),
    ("step_drift.py", ["--after", "64x2"], "is not a request count or REQUESTSxPROMPTxOUTPUT"),
    ("step_drift.py", ["--after", "8x4096x4"], "--max-batched-tokens must be at least the prompts' 4096 tokens"),
    ("step_drift.py", ["--after", "64", "64x128x256"], "--after names a load twice"),
    ("step_drift.py", ["--after", "1x128x9000"], "a request of more than the model's 8192 positions"),
    ("step_drift.py", ["--kv-cache-gib", "0"], "--kv-cache-gib must be positive"),
    ("step_drift.py", ["--max-batched-tokens", "64"], "--max-batched-tokens must be at least the prompts' 128 tokens"),
    ("step_drift.py", ["--synthetic", "no-such-preset"], "--synthetic takes a preset")])
def test_the_decode_benchmarks_refuse_bad_input(script, args, message, tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT.with_name(script)), *args, "--json", str(tmp_path / "out.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "out.json").exists()
