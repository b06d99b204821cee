"""Recipe files: every shipped recipe validates and runs; every kind of bad recipe is refused with
the file, line, key and what is wrong; flags override the file; gates block a bad model."""

import json
from pathlib import Path

import pytest

from qtool.cli.app import main
from qtool.errors import QtoolError
from qtool.quantize.recipe_file import build, check_matches, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
FAST = ["--nsamples", "8", "--seqlen", "64"]  # flags over the recipe, so the tiny model runs in seconds


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def refusal(tmp_path, text: str) -> str:
    with pytest.raises(QtoolError) as error:
        load_recipe(write(tmp_path, text))
    return str(error.value).replace(str(tmp_path / "recipe.yaml"), "R.yaml")


def test_the_shipped_recipes_are_all_there():
    assert {path.name for path in RECIPES} == {
        "w4a16-awq-g64.yaml", "w4a16-gptq-g64.yaml", "w4a16-awq-gptq-g64.yaml", "w3-squeezellm-sparse.yaml",
        "w8a16-rtn.yaml", "w8a8-smoothquant-gptq.yaml", "mixed-attn4-mlp8.yaml", "tiny-ci.yaml"}
    for path in RECIPES:
        header = path.read_text().splitlines()[0]
        assert header.startswith("# ") and len(header) > 20, f"{path.name} needs a comment header"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_and_runs_on_a_tiny_model(path, tiny_llama_dir, tmp_path, capsys):
    assert main(["recipe", "validate", str(path), "--model", str(tiny_llama_dir)]) == 0
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--recipe", str(path), *FAST, "--quiet"]) == 0
    record = json.loads((out / "qtool.json").read_text())
    expected = load_recipe(path).recipe
    assert record["recipe"]["method"] == expected.method and record["recipe"]["scheme"]["bits"] == expected.scheme.bits
    assert record["recipe"]["calibration"]["nsamples"] == 8  # the flag, over the file


@pytest.mark.parametrize("text, message", [
    ("methd: gptq\n", "R.yaml:1: methd: unknown key 'methd'; known here: method, scheme, overrides, calibration, "
                      "output, mse, gptq, awq, squeezellm, smoothquant, gates"),
    ("method: gptq\nscheme:\n  bits: 4\n  groupsize: 64\n", "R.yaml:4: scheme.groupsize: unknown key 'groupsize'; "
                                                           "known here: bits, group_size, symmetric, lut, activation_bits"),
    ("scheme: {bits: '4'}\n", "R.yaml:1: scheme.bits: must be an int, got '4'"),
    ("scheme:\n  symmetric: 1\n", "R.yaml:2: scheme.symmetric: must be a bool, got 1"),
    ("calibration:\n  nsamples: 1.5\n", "R.yaml:2: calibration.nsamples: must be an int, got 1.5"),
    ("scheme:\n  bits: 9\n", "R.yaml:1: scheme: bits must be an integer from 2 to 8, got 9"),
    ("method: magic\n", "R.yaml:1: method: unknown method 'magic'; choose one of: awq, awq+gptq, gptq, rtn, smoothquant, smoothquant+gptq, squeezellm"),
    ("output: {format: gguf}\n", "R.yaml:1: output.format: unknown format 'gguf'; choose one of: awq, "
                                 "compressed-tensors, gptq, qtool"),
    ("overrides:\n  - match: '(mlp'\n    skip: true\n", "R.yaml:2: overrides.0.match: layer pattern '(mlp' is not a "
                                                      "valid regular expression: missing ), unterminated subpattern "
                                                      "at position 0"),
    ("overrides:\n  - match: mlp\n    skip: true\n    scheme: {bits: 8}\n",
     "R.yaml:3: overrides.0.skip: an override either skips (skip: true) or gives a scheme, not both"),
    ("gates: {max_ppl_increase_pct: -5}\n", "R.yaml:1: gates: gate limits must be positive"),
    ("scheme: [4, 64]\n", "R.yaml:1: scheme: must be a mapping, got list"),
    ("method: gptq\nmethod: awq\n", "line 2: method appears twice"),
    ("method: gptq\nscheme: {bits: 4\n", "R.yaml:3: not valid YAML: expected ',' or '}', but got '<stream end>'"),
])
def test_bad_recipes_are_refused_with_file_line_and_key(tmp_path, text, message):
    assert refusal(tmp_path, text) == message


def test_an_override_that_matches_no_layer_is_refused_with_its_line(tmp_path, tiny_llama_dir, capsys):
    path = write(tmp_path, "method: rtn\noverrides:\n  - match: 'mlp\\.donw_proj'\n    skip: true\n")
    recipe_file = load_recipe(path)
    with pytest.raises(QtoolError, match=r"recipe.yaml:3: overrides.0.match: 'mlp\\\\.donw_proj' matches no linear layer"):
        check_matches(recipe_file, ["model.layers.0.mlp.down_proj"])
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--recipe", str(path)]) == 2
    assert "matches no linear layer" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_flags_override_the_file_and_skips_go_first(tmp_path):
    from qtool.cli.quantize_cmd import build_recipe

    path = write(tmp_path, "method: gptq\nscheme: {bits: 4, group_size: 32}\noverrides:\n  - {match: 'q_proj', skip: true}\n")
    options = {"recipe": path, "bits": 8, "skip": ["k_proj"], "outliers": None}
    recipe = build_recipe(options).recipe
    assert recipe.method == "gptq" and recipe.scheme.bits == 8 and recipe.scheme.group_size == 32
    assert [o.pattern for o in recipe.overrides] == ["k_proj", "q_proj"]


def test_method_defaults_fill_what_a_recipe_leaves_out():
    recipe = build({"method": "squeezellm"}).recipe
    assert recipe.scheme.group_size == -1 and recipe.scheme.lut and recipe.calibration.nsamples == 100
    assert recipe.format == "qtool"
    assert build({"method": "squeezellm", "scheme": {"group_size": 64}}).recipe.scheme.group_size == 64


def test_recipe_show_lists_each_layers_scheme(tmp_path, tiny_llama_dir, capsys):
    path = write(tmp_path, "method: rtn\noverrides:\n  - match: 'mlp\\.'\n    scheme: {bits: 8, group_size: -1, symmetric: true}\n")
    assert main(["recipe", "show", str(path), "--model", str(tiny_llama_dir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["recipe"]["calibration"]["nsamples"] == 128  # defaults filled in
    assert shown["layers"]["model.layers.0.mlp.up_proj"] == "W8 per-channel sym"
    assert shown["layers"]["model.layers.0.self_attn.q_proj"] == "W4 g64 asym"


def test_a_failing_gate_blocks_the_model(tmp_path, tiny_llama_dir, tiny_text_file, capsys):
    gates = f"dataset: '{tiny_text_file}', seqlen: 64, max_windows: 2, max_ppl_increase_pct: 1000"
    strict = write(tmp_path, f"method: rtn\nscheme: {{bits: 2, group_size: 32}}\ngates: {{{gates}, max_ppl: 1.0}}\n")
    out = tmp_path / "out"
    code = main(["quantize", str(tiny_llama_dir), "-o", str(out), "--recipe", str(strict), "--check", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and result["gates"]["passed"] is False
    assert [gate["passed"] for gate in result["gates"]["gates"]] == [True, False]  # the increase passes, max_ppl not
    assert main(["eval", str(out), "--gates", str(strict)]) == 1
    assert "FAIL" in capsys.readouterr().out
    loose = write(tmp_path, strict.read_text().replace("max_ppl: 1.0", "max_ppl: 1.0e+9"))
    assert main(["eval", str(out), "--gates", str(loose), "--quiet"]) == 0


def test_check_needs_gates(tmp_path, tiny_llama_dir, capsys):
    path = write(tmp_path, "method: rtn\n")
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--recipe", str(path), "--check"]) == 2
    assert "has none; add a gates section" in capsys.readouterr().err
