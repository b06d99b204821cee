"""`qtool quantize --bits auto:B / --max-size S` on a tiny model: the plan meets its budget as
`qtool inspect` measures it, runs through the methods, and the costs behave as costs."""

import json

import pytest
import torch

from qtool.calibrate.sensitivity import DEFAULT_CANDIDATES, fisher_costs, kl_costs, parse_candidates
from qtool.cli.app import main
from qtool.quantize.scheme import Recipe, Scheme
from qtool.runtime.loader import load_model


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def inspect_json(capsys, folder) -> dict:
    code, out, _ = run(capsys, "inspect", folder, "--json")
    assert code == 0
    return json.loads(out)


@pytest.mark.parametrize("method, budget", [("rtn", 4.25), ("gptq", 3.5)])
def test_auto_bits_meet_the_budget_as_inspect_reports_it(capsys, tiny_llama_dir, tmp_path, calibration_flags, method, budget):
    out = tmp_path / "mixed"
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", out, "--method", method, "--bits", f"auto:{budget}",
                       *calibration_flags)
    assert code == 0, err
    summary = inspect_json(capsys, out)
    assert budget - 0.01 <= summary["block_bits_per_weight"] <= budget
    record = json.loads((out / "qtool.json").read_text())
    allocation = record["allocation"]
    assert allocation["bits_per_weight"] == pytest.approx(summary["block_bits_per_weight"])
    assert allocation["sensitivity"] == "fisher" and allocation["candidates"] == DEFAULT_CANDIDATES
    schemes = {layer["scheme"] for layer in summary["layers"]}
    assert len(schemes) + bool(summary["dense_linears"]) >= 2  # mixed, not one scheme everywhere
    load_model(out)  # every scheme loads


def test_max_size_bounds_the_checkpoint_tensors(capsys, tiny_llama_dir, tmp_path, calibration_flags):
    dense_total = inspect_json(capsys, tiny_llama_dir)["total_bytes"]
    limit = int(dense_total * 0.8)
    out = tmp_path / "sized"
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", out, "--max-size", f"{limit}B", *calibration_flags)
    assert code == 0, err
    assert inspect_json(capsys, out)["total_bytes"] <= limit


def test_plan_only_prints_the_plan_and_writes_nothing(capsys, tiny_llama_dir, tmp_path, calibration_flags):
    code, out, _ = run(capsys, "quantize", tiny_llama_dir, "--bits", "auto:5", "--candidates", "4g64,8cs,dense",
                       "--plan-only", "--json", *calibration_flags)
    assert code == 0
    plan = json.loads(out)["allocation"]
    assert plan["bits_per_weight"] <= 5 and set(plan["layers"].values()) <= {"4g64", "8cs", "dense"}
    assert len(plan["layers"]) == 14  # 2 blocks x 7 linears
    assert list(tmp_path.iterdir()) == []


def test_the_recipe_s_own_overrides_are_kept(capsys, tiny_llama_dir, tmp_path, calibration_flags):
    code, out, _ = run(capsys, "quantize", tiny_llama_dir, "--bits", "auto:7", "--skip", "down_proj", "--plan-only",
                       "--json", *calibration_flags)
    assert code == 0
    layers = json.loads(out)["allocation"]["layers"]
    assert all(scheme == "dense" for name, scheme in layers.items() if name.endswith("down_proj"))


@pytest.mark.parametrize("args, message", [
    (["--bits", "auto:x"], "cannot read --bits 'auto:x'; write auto:B with B the average bits per weight, e.g. auto:4.25"),
    (["--bits", "four"], "cannot read --bits 'four'; write an integer from 2 to 8, or auto:B (e.g. auto:4.25)"),
    (["--bits", "auto:4", "--max-size", "1MB"], "--bits auto:B and --max-size are two budgets; give one"),
    (["--candidates", "4g64,dense"], "--candidates goes with a budget: --bits auto:B or --max-size S"),
    (["--bits", "auto:4", "--sensitivity", "hessian"], "unknown --sensitivity 'hessian'; choose one of: fisher, kl"),
    (["--bits", "auto:2.5"], "the budget (2.500 bits per weight) is below the smallest the candidate schemes allow"),
    (["--max-size", "1kB"], "--max-size 1,000 bytes is not more than the tensors left dense"),
])
def test_bad_budgets_are_one_line_errors(capsys, tiny_llama_dir, tmp_path, calibration_flags, args, message):
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "-o", tmp_path / "x", *args, *calibration_flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_costs_fall_with_more_bits_and_vanish_when_dense(tiny_llama_dir):
    model = load_model(tiny_llama_dir, torch.float32)
    candidates = parse_candidates("3g64,4g64,8cs,dense")
    recipe = Recipe()
    torch.manual_seed(0)
    windows = torch.randint(0, 512, (2, 24))
    kl = kl_costs(model, windows, candidates, recipe, torch.float16)
    fisher = {name: torch.rand(model.get_submodule(name).weight.shape) for name in kl}
    layers = {name: (lambda name=name: model.get_submodule(name).weight.detach().float()) for name in kl}
    weighted = fisher_costs(layers, fisher, candidates, recipe, torch.float16)
    for costs in (kl, weighted):
        assert set(costs) == {f"model.layers.{i}.{part}" for i in range(2) for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        for name, by_scheme in costs.items():
            assert by_scheme["dense"] == 0 and min(by_scheme.values()) >= 0
            if costs is weighted or not name.endswith(("q_proj", "k_proj")):  # a random model's attention is
                assert by_scheme["3g64"] > by_scheme["4g64"] > by_scheme["8cs"], (name, by_scheme)  # ~uniform
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # weights restored as they were
    reference = load_model(tiny_llama_dir, torch.float32)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight)


def test_help_names_the_default_candidates():
    import inspect

    from qtool.cli import app

    assert f"default {DEFAULT_CANDIDATES})" in inspect.getsource(app.quantize)


def test_pareto_writes_a_table_json_and_plot_of_uniform_and_allocated_points(capsys, tiny_llama_dir, tmp_path, tiny_text_file):
    out = tmp_path / "pareto"
    code, stdout, err = run(capsys, "pareto", tiny_llama_dir, "-o", out, "--budgets", "5", "--uniform", "4g64",
                            "--seqlen", "64", "--max-windows", "2", "--quiet", "--",
                            "--calib", tiny_text_file, "--nsamples", "4", "--seqlen", "48")
    assert code == 0, err
    result = json.loads((out / "pareto.json").read_text())
    assert [(p["kind"], p["label"]) for p in result["points"]] == [("uniform", "uniform 4g64"), ("allocated", "auto 5")]
    assert result["points"][1]["bits_per_weight"] <= 5 and result["original_ppl"] > 1
    assert all(p["ppl"] > 1 for p in result["points"]) and (out / "pareto.png").stat().st_size > 10_000
    assert "| auto 5 |" in (out / "pareto.md").read_text() and "| uniform 4g64 |" in stdout
    assert sorted(path.name for path in out.iterdir()) == ["pareto.json", "pareto.md", "pareto.png"]
