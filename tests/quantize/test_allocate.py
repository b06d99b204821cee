"""The budgeted allocation: optimal against brute force on small instances, never over budget,
and sizes that are exactly what a format writes."""

import itertools
import random

import pytest
import torch

from qtool.calibrate.sensitivity import DENSE, candidate_name, parse_candidates
from qtool.errors import QtoolError
from qtool.quantize.allocate import Option, allocate, stored_bytes
from qtool.quantize.format import FORMATS
from qtool.quantize.methods import round_to_nearest
from qtool.quantize.scheme import Scheme


def random_options(rng: random.Random, layers: int, choices: int) -> dict[str, list[Option]]:
    """Options whose cost falls as bytes grow, with noise (so hulls are not trivial)."""
    options = {}
    for layer in range(layers):
        sizes = sorted(rng.sample(range(10, 200), choices))
        costs = sorted((rng.uniform(0, 100) for _ in sizes), reverse=True)
        options[f"layer{layer}"] = [Option(Scheme(2 + i, -1, True), size, cost) for i, (size, cost) in enumerate(zip(sizes, costs))]
    return options


def brute_force(options: dict[str, list[Option]], budget: int) -> float:
    best = float("inf")
    for combination in itertools.product(*options.values()):
        if sum(o.bytes for o in combination) <= budget:
            best = min(best, sum(o.cost for o in combination))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocation_stays_within_budget_and_is_near_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    options = random_options(rng, layers=5, choices=4)
    smallest = sum(min(o.bytes for o in opts) for opts in options.values())
    largest = sum(max(o.bytes for o in opts) for opts in options.values())
    budget = rng.randint(smallest, largest)
    allocation = allocate(options, budget, {name: 100 for name in options})
    assert allocation.bytes <= budget
    optimum = brute_force(options, budget)
    # The Lagrangian plus greedy top-up is exact on the hull; off it, within the largest single step.
    largest_step = max(max(o.cost for o in opts) - min(o.cost for o in opts) for opts in options.values())
    assert optimum <= allocation.cost <= optimum + largest_step


def test_a_generous_budget_keeps_everything_at_the_cheapest_cost_and_a_tight_one_at_the_smallest():
    options = random_options(random.Random(7), layers=4, choices=3)
    generous = allocate(options, 10**6, {name: 1 for name in options})
    assert all(option.cost == min(o.cost for o in options[name]) for name, option in generous.choices.items())
    smallest = sum(min(o.bytes for o in opts) for opts in options.values())
    tight = allocate(options, smallest, {name: 1 for name in options})
    assert tight.bytes == smallest


def test_a_budget_below_the_smallest_candidates_is_refused_with_both_figures():
    options = {"a": [Option(Scheme(4, -1, True), 50, 1.0)], "b": [Option(Scheme(4, -1, True), 50, 1.0)]}
    with pytest.raises(QtoolError, match=r"the budget \(2\.000 bits per weight\) is below the smallest the candidate "
                                         r"schemes allow \(4\.000\); raise it or add smaller candidates"):
        allocate(options, 50, {"a": 100, "b": 100})


def test_overrides_match_each_layer_exactly():
    options = {"model.layers.1.mlp.up_proj": [Option(Scheme(4, 64), 10, 0.0)],
               "model.layers.11.mlp.up_proj": [Option(DENSE, 20, 0.0)]}
    overrides = allocate(options, 100, {name: 10 for name in options}).overrides()
    assert [o.matches("model.layers.1.mlp.up_proj") for o in overrides] == [True, False]
    assert [o.matches("model.layers.11.mlp.up_proj") for o in overrides] == [False, True]
    assert overrides[1].scheme is None


@pytest.mark.parametrize("format_name", ["compressed-tensors", "gptq", "qtool"])
@pytest.mark.parametrize("scheme", [Scheme(3, 64), Scheme(4, 32, True), Scheme(8, -1, True), Scheme(2, 16)])
def test_stored_bytes_are_the_bytes_the_format_writes(format_name, scheme):
    weight = torch.randn(48, 128)
    fmt = FORMATS.get(format_name)
    written = fmt.layer_tensors("x", round_to_nearest(weight, scheme, scale_dtype=torch.float16).weight)
    assert stored_bytes((48, 128), scheme, fmt, torch.float16, 2) == sum(t.numel() * t.element_size() for t in written.values())
    assert stored_bytes((48, 128), DENSE, fmt, torch.float16, 2) == 48 * 128 * 2


def test_candidates_parse_and_print_back():
    text = "3g64,4g128,4g64s,8cs,2c,dense"
    candidates = parse_candidates(text)
    assert candidates[:3] == [Scheme(3, 64, False), Scheme(4, 128, False), Scheme(4, 64, True)]
    assert candidates[3] == Scheme(8, -1, True) and candidates[4] == Scheme(2, -1, False) and candidates[5] is DENSE
    assert ",".join(candidate_name(c) for c in candidates) == text


@pytest.mark.parametrize("text, message", [
    ("4g64,5x", "cannot read candidate scheme '5x'; write e.g. 4g64 (asymmetric), 4g64s (symmetric), 8cs (per channel, symmetric) or dense"),
    ("9g64", "cannot read candidate scheme '9g64'"),
    ("4g64,4g64", "--candidates '4g64,4g64' names a scheme twice"),
])
def test_bad_candidates_are_refused(text, message):
    with pytest.raises(QtoolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_candidates(text)
