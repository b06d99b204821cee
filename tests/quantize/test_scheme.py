import pytest

from qtool.errors import QtoolError
from qtool.quantize.scheme import CalibrationSpec, Override, Recipe, Scheme, SqueezeLLMOptions


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_bits_outside_two_to_eight_are_refused(bits):
    with pytest.raises(QtoolError, match="bits must be an integer from 2 to 8"):
        Scheme(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, 3.5, False])
def test_group_size_must_be_positive_or_minus_one(group_size):
    with pytest.raises(QtoolError, match="group size"):
        Scheme(group_size=group_size)


def test_valid_schemes_describe_themselves():
    assert Scheme(4, 64, False).describe() == "W4 g64 asym"
    assert Scheme(8, -1, True).describe() == "W8 per-channel sym"


def test_bad_regex_is_refused_with_the_pattern_named():
    with pytest.raises(QtoolError, match=r"'\(mlp' is not a valid regular expression"):
        Override("(mlp", None)


def test_first_matching_override_wins_and_default_applies_elsewhere():
    eight = Scheme(8, -1, True)
    recipe = Recipe(
        scheme=Scheme(4, 64, False),
        overrides=(Override(r"layers\.0\.", None), Override(r"mlp", eight)),
    )
    assert recipe.scheme_for("model.layers.0.mlp.down_proj") is None
    assert recipe.scheme_for("model.layers.1.mlp.down_proj") == eight
    assert recipe.scheme_for("model.layers.1.self_attn.q_proj") == Scheme(4, 64, False)


@pytest.mark.parametrize("field", ["nsamples", "seqlen"])
def test_calibration_sizes_must_be_positive(field):
    with pytest.raises(QtoolError, match=f"calibration {field}"):
        CalibrationSpec(**{field: 0})


def test_recipe_serialises_every_setting_in_the_shape_of_a_recipe_file():
    from qtool.quantize.recipe_file import build

    recipe = Recipe(overrides=(Override("lm_head", Scheme(8, -1, True)), Override("gate", None)))
    data = recipe.to_dict()
    assert data["method"] == "rtn" and data["output"] == {"format": "compressed-tensors", "kv_cache_dtype": "auto"}
    assert data["scheme"] == {"bits": 4, "group_size": 64, "symmetric": False, "lut": False, "activation_bits": None}
    assert data["overrides"] == [
        {"match": "lm_head", "scheme": {"bits": 8, "group_size": -1, "symmetric": True, "lut": False,
                                        "activation_bits": None}},
        {"match": "gate", "skip": True},
    ]
    assert data["squeezellm"] == {"outliers": 0.0, "sensitive_fraction": 0.0005, "fisher": True, "max_iterations": 100}
    assert data["smoothquant"] == {"alpha": 0.8}
    assert build(data).recipe == recipe  # qtool.json's recipe is a recipe file


@pytest.mark.parametrize("settings, message", [
    ({"outliers": 0.6}, "outliers must be a fraction"),
    ({"sensitive_fraction": -0.1}, "sensitive fraction must be a fraction"),
    ({"max_iterations": 0}, "max iterations"),
])
def test_squeezellm_options_are_checked(settings, message):
    with pytest.raises(QtoolError, match=message):
        SqueezeLLMOptions(**settings)
