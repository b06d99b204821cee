"""`qtool recipe validate|show`: check a recipe file, and show what it does to a model's layers."""

from __future__ import annotations

from pathlib import Path

from qtool.cli import console
from qtool.quantize.recipe_file import RecipeFile, check_matches, load_recipe


def run_validate(path: Path, model: str | None, trust_remote_code: bool) -> None:
    recipe_file = load_recipe(path)
    if model is not None:
        _plan(recipe_file, model, trust_remote_code)
    recipe = recipe_file.recipe
    gates = "" if recipe_file.gates is None else f", gated at +{recipe_file.gates.max_ppl_increase_pct:g}% perplexity"
    against = f" for {model}" if model else ""
    console.stdout.print(f"{path}: valid{against}: {recipe.method}, {recipe.scheme.describe()}, "
                         f"{len(recipe.overrides)} override(s), {recipe.format}{gates}", markup=False, highlight=False)


def run_show(path: Path, model: str | None, trust_remote_code: bool, json_output: bool) -> None:
    """The effective recipe (every default filled in) as YAML, and with a model each layer's scheme."""
    import yaml

    recipe_file = load_recipe(path)
    data = recipe_file.recipe.to_dict()
    if recipe_file.gates is not None:
        data["gates"] = {key: value for key, value in vars(recipe_file.gates).items() if value is not None}
    layers = _plan(recipe_file, model, trust_remote_code) if model else None
    if json_output:
        console.print_json({"recipe": data, **({"layers": layers} if layers is not None else {})})
        return
    console.stdout.print(yaml.safe_dump(data, sort_keys=False).rstrip(), markup=False, highlight=False)
    if layers is not None:
        from rich.table import Table

        table = Table(title=f"{model}: the scheme of each linear layer")
        table.add_column("layer")
        table.add_column("scheme")
        for name, scheme in layers.items():
            table.add_row(name, scheme)
        console.stdout.print(table)


def _plan(recipe_file: RecipeFile, model: str, trust_remote_code: bool) -> dict[str, str]:
    """Each linear layer's scheme ("dense" when left unquantized) in the model's module order,
    after checking that every override matches some layer and that group sizes fit."""
    from qtool.quantize.apply import check_group_sizes, linear_layers, plan_layers
    from qtool.runtime.lazy import build_skeleton
    from qtool.runtime.resolve import resolve_model

    import torch

    skeleton = build_skeleton(resolve_model(model), torch.float32, trust_remote_code)
    check_matches(recipe_file, list(linear_layers(skeleton)))
    plan = plan_layers(skeleton, recipe_file.recipe)
    check_group_sizes(skeleton, plan)
    return {name: "dense" if scheme is None else scheme.describe() for name, scheme in plan.items()}
