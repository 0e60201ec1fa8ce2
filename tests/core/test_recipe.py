import pytest
import torch
import zoo
from fxcompress.passes import PASSES
from fxcompress.passes.quant.fold_bn import FoldBatchNorm

import fxcompress as fxc


def _unchanged(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("recipe", [
    [{"pass": "fold_bn"}],
    {"pass": "fold_bn"},
    [FoldBatchNorm()],
    "toml",
])
def test_recipe_forms(recipe, tmp_path):
    if recipe == "toml":
        recipe = tmp_path / "r.toml"
        recipe.write_text('[[passes]]\npass = "fold_bn"\n')
    model, inputs = zoo.build("residual")
    result = fxc.compile(model, inputs, recipe)
    assert [r.name for r in result.history] == ["fold_bn"]
    assert result.history[0].stats["bn_folded"] == 5


def test_unknown_pass_lists_valid_and_suggests():
    model, inputs = zoo.build("residual")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxc.RecipeError) as err:
        fxc.compile(model, inputs, [{"pass": "fold_bnn"}])
    msg = str(err.value)
    assert "unknown pass 'fold_bnn'" in msg and "Did you mean 'fold_bn'?" in msg
    assert "Valid passs" not in msg and all(name in msg for name in PASSES)
    assert _unchanged(model, state)


def test_unknown_option_lists_valid_options():
    model, inputs = zoo.build("residual")
    with pytest.raises(fxc.RecipeError, match=r"pass 'fold_bn' has no option 'ratio'.*Valid options: \(none\)"):
        fxc.compile(model, inputs, [{"pass": "fold_bn", "ratio": 0.5}])


def test_unknown_option_suggests_closest():
    from fxcompress.pass_base import Contract, Pass

    class Opt(Pass):
        name = "opt"
        contract = Contract.EXACT

        def __init__(self, energy: float = 0.9, rank_ratio: float | None = None):
            self.energy, self.rank_ratio = energy, rank_ratio

    with pytest.raises(fxc.RecipeError, match="Did you mean 'energy'.*Valid options: energy, rank_ratio"):
        Opt.from_options({"enrgy": 0.5})
    assert Opt.from_options({"energy": 0.5}).options() == {"energy": 0.5, "rank_ratio": None}


@pytest.mark.parametrize("text, match", [
    ('[[passes]]\npass = "fold_bn"\n[[pases]]\npass = "x"\n', "unknown top-level key 'pases'.*Did you mean 'passes'"),
    ('[[passes]\npass = "fold_bn"', "not valid TOML"),
    ('title = 1\n', "unknown top-level key 'title'"),
    ('', "no \\[\\[passes\\]\\] tables"),
    ('[[passes]]\nname = "fold_bn"\n', "must be a pass object or a dict with a 'pass' name"),
])
def test_bad_toml_recipes(tmp_path, text, match):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(fxc.RecipeError, match=match):
        fxc.PassManager(path)


def test_missing_recipe_file():
    with pytest.raises(fxc.RecipeError, match="does not exist"):
        fxc.PassManager("nope.toml")


@pytest.mark.parametrize("recipe", [42, [1], [{"pass": 3}]])
def test_bad_recipe_types(recipe):
    with pytest.raises(fxc.RecipeError):
        fxc.PassManager(recipe)


def test_compile_result_contract():
    model, inputs = zoo.build("splits_views")
    result = fxc.compile(model, inputs, [{"pass": "fold_bn"}])
    assert isinstance(result.module, torch.fx.GraphModule) and not result.module.training
    out, ref = result.module(*inputs), model(*inputs)
    assert type(out) is dict and out.keys() == ref.keys()
    record = result.history[0]
    assert (record.name, record.modified) == ("fold_bn", True) and record.seconds >= 0 and isinstance(record.stats, dict)
    assert result.before.params > result.after.params  # BN parameters are gone
    assert result.before.macs == result.after.macs


def test_empty_recipe_compiles_to_the_traced_model():
    model, inputs = zoo.build("attention")
    result = fxc.compile(model, inputs, [])
    assert result.history == []
    torch.testing.assert_close(result.module(*inputs), model(*inputs), rtol=0, atol=0)
