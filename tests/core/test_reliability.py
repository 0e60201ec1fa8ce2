"""No silent wrong result: options of the wrong type, patterns that match nothing and passes that cannot apply are
refused; frozen and tied parameters, custom autograd.Functions and inputs written in place are respected; what a user
can get wrong is an FxCompressError that names the thing and says what to do."""
from __future__ import annotations

import inspect
import subprocess
import sys
import typing

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxcompress.passes import PASSES
from zoo import TiedEmbedding, build, randomize_bn

import fxcompress as fxc
from fxcompress.errors import InputError, PassError, RecipeError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(8 * 8 * 8, 4))).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
CALIB = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]


# ---- options are checked, never ignored ------------------------------------------------------------------------

def _wrong_value(hint) -> object:
    """A value no annotation of these passes accepts together with ``hint``'s own type."""
    args = set(typing.get_args(hint)) | {hint}
    if bool in args:
        return "no"
    if int in args or float in args:
        return "many"
    return 2.5 if str in args else object()


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_option_of_every_pass_is_type_checked(name):
    cls = PASSES[name]
    init = inspect.unwrap(cls.__init__)
    hints = typing.get_type_hints(init)
    options = [p for p in inspect.signature(init).parameters.values()
               if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if hasattr(cls, "set_loop"):  # training passes: the loop options too
        from fxcompress.passes.train.lib.training import Loop
        hints |= typing.get_type_hints(Loop)
        options += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in typing.get_type_hints(Loop)]
    for p in options:
        if p.name in ("teacher", "features", "loss"):
            continue  # objects, checked by their own messages (test_distill, test_training)
        with pytest.raises(RecipeError, match=rf"{p.name}"):
            cls.from_options({p.name: _wrong_value(hints[p.name])})


def test_per_channel_no_is_refused_not_taken_as_true():
    with pytest.raises(RecipeError, match="'per_channel' must be a bool .true or false., got 'no'"):
        fxc.compile(_net(), X, [{"pass": "quantize", "per_channel": "no"}], calibration_data=CALIB)
    with pytest.raises(RecipeError, match="'fold_bn' must be a bool"):
        fxc.compile(_net(), X, [{"pass": "quantize", "fold_bn": 0}], calibration_data=CALIB)


@pytest.mark.parametrize("recipe, match", [
    ([{"pass": "quantize", "exclude": ["nope"]}], "exclude pattern 'nope' matches no module"),
    ([{"pass": "prune", "exclude": ["nope"]}], "exclude pattern 'nope' matches no module"),
    ([{"pass": "low_rank", "exclude": ["nope"]}], "exclude pattern 'nope' matches no module"),
    ([{"pass": "prune", "ratio": {"layer9": 0.5}}], "ratio pattern 'layer9' matches no module"),
    ([{"pass": "prune", "ratio": {"7": 0.5}}], "ratio pattern '7' matches no prunable group"),
])
def test_patterns_that_match_nothing_are_errors(recipe, match):
    with pytest.raises(RecipeError, match=match):
        fxc.compile(_net(), X, recipe, calibration_data=CALIB)


def test_exclude_and_ratio_patterns_take_names_prefixes_and_wildcards():
    model, x = build("residual")
    for recipe in ([{"pass": "quantize", "exclude": ["stem"]}], [{"pass": "quantize", "exclude": ["stem.*"]}]):
        plan = fxc.compile(model, x, recipe, calibration_data=[x]).plans["quant_plan"]
        assert any("stem.0: excluded" in why for why in plan.float_ops.values())
    result = fxc.compile(model, x, [{"pass": "prune", "ratio": {"a": 0.5}}])
    assert result.module.get_submodule("a.0").out_channels < model.get_submodule("a.0").out_channels


def test_unknown_concrete_args_are_refused():
    class Flag(nn.Module):
        def forward(self, x, scale: bool = False):
            return x * 2 if scale else x

    with pytest.raises(InputError, match="concrete_args names 'scal'.*Did you mean 'scale'"):
        fxc.compile(Flag(), X, [{"pass": "fold_bn"}], concrete_args={"scal": True})


# ---- passes that cannot apply say so --------------------------------------------------------------------------

@pytest.mark.parametrize("later, match", [
    ({"pass": "prune"}, "Prune before quantizing"), ({"pass": "low_rank"}, "Factorize before quantizing"),
    ({"pass": "quantize"}, "Quantize a model once"), ({"pass": "lower_quantized"}, "already lowered"),
    ({"pass": "fold_bn"}, "Fold BatchNorm before quantizing"), ({"pass": "finetune"}, "before insert_observers"),
])
def test_passes_after_quantize_refuse_with_the_order_to_use(later, match):
    with pytest.raises(PassError, match=match):
        fxc.compile(_net(), X, [{"pass": "quantize", "fold_bn": later["pass"] != "fold_bn"}, later],
                    calibration_data=CALIB,
                    train_data=[(CALIB[0], torch.zeros(4, dtype=torch.long))])
    quantized = fxc.compile(_net(), X, [{"pass": "quantize", "fold_bn": later["pass"] != "fold_bn"}],
                            calibration_data=CALIB).module
    if later["pass"] != "lower_quantized":  # the compiled module traces again; the pass refuses it the same way
        with pytest.raises(PassError, match=match):
            fxc.compile(quantized, X, [later], calibration_data=CALIB,
                        train_data=[(CALIB[0], torch.zeros(4, dtype=torch.long))])


# ---- training respects what the user set ----------------------------------------------------------------------

TRAIN = [(CALIB[i], torch.randint(0, 4, (4,), generator=torch.Generator().manual_seed(i))) for i in range(3)]


def test_eval_fn_returning_nan_is_an_error_not_a_discarded_training():
    with pytest.raises(InputError, match="eval_fn returned nan"):
        fxc.compile(_net(), X, [{"pass": "finetune", "patience": 1}], train_data=TRAIN,
                    eval_fn=lambda m: float("nan"))


def test_frozen_parameters_stay_frozen_and_unchanged():
    model = _net()
    model[0].weight.requires_grad_(False)
    result = fxc.compile(model, X, [{"pass": "prune", "ratio": 0.25, "mode": "mask"},
                                    {"pass": "finetune", "epochs": 2, "lr": 0.1}], train_data=TRAIN)
    trained = result.module
    assert not trained.get_submodule("0").weight.requires_grad
    assert trained.get_submodule("3").weight.requires_grad
    mask = result.plans["channel_masks"]["0.weight"]
    assert torch.equal(trained.get_submodule("0").weight, model[0].weight * mask)  # only masked, never trained
    assert not torch.equal(trained.get_submodule("3").weight, model[3].weight)
    model.requires_grad_(False)
    with pytest.raises(InputError, match="every parameter of the model is frozen"):
        fxc.compile(model, X, [{"pass": "finetune"}], train_data=TRAIN)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad  # straight through


class _Binarize(nn.Module):
    def forward(self, x):
        return _SignSTE.apply(x)


def test_a_custom_autograd_function_in_a_submodule_stays_opaque_and_trains():
    model = nn.Sequential(nn.Linear(6, 8), _Binarize(), nn.Linear(8, 3))
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    result = fxc.compile(model, x, [{"pass": "finetune", "epochs": 3, "lr": 0.5}],
                         train_data=[(x, torch.arange(16) % 3)])
    assert "custom autograd.Function _SignSTE" in result.trace.auto_leaves["1"]
    assert not torch.equal(result.module.get_submodule("0").weight, model[0].weight)  # the layer before it trained


def test_a_custom_autograd_function_in_the_top_level_forward_is_refused_by_training():
    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(_SignSTE.apply(self.a(x)))

    x = torch.randn(16, 6)
    assert fxc.compile(Top(), x, [{"pass": "fold_bn"}]).trace.inlined_functions == ("_SignSTE",)
    with pytest.raises(PassError, match="calls the custom autograd.Function _SignSTE directly"):
        fxc.compile(Top(), x, [{"pass": "finetune"}], train_data=[(x, torch.arange(16) % 3)])


@pytest.mark.parametrize("recipe", [
    [{"pass": "prune", "ratio": 0.5}], [{"pass": "prune", "ratio": 0.5, "mode": "mask"}], [{"pass": "fold_bn"}],
    [{"pass": "low_rank", "rank_ratio": 0.5}], [{"pass": "quantize"}],
    [{"pass": "prune", "ratio": 0.5}, {"pass": "finetune", "epochs": 2, "loss": "mse"}],
])
def test_tied_parameters_stay_one_parameter(recipe):
    torch.manual_seed(0)
    tokens = torch.randint(0, 20, (4, 5))
    target = torch.randn(4, 5, 20)
    result = fxc.compile(TiedEmbedding(), tokens, recipe, calibration_data=[tokens], train_data=[(tokens, target)])
    m = result.module
    assert m.head.weight is m.embed.weight
    assert len(list(m.parameters())) == len(list(TiedEmbedding().parameters()))


def test_pruning_a_tied_embedding_removes_the_same_channels_at_every_use():
    torch.manual_seed(0)
    tokens = torch.randint(0, 20, (4, 5))
    model = TiedEmbedding().eval()
    masked = fxc.compile(model, tokens, [{"pass": "prune", "ratio": 0.5, "mode": "mask"}])
    removed = fxc.compile(model, tokens, [{"pass": "prune", "ratio": 0.5}])
    assert removed.module.embed.weight.shape == (20, 8)
    with torch.no_grad():
        assert torch.allclose(masked.module(tokens), removed.module(tokens), atol=1e-5)


class _WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x.mul_(2)
        return self.bn(self.conv(x))


def test_inputs_the_forward_writes_to_are_never_the_users():
    model = randomize_bn(_WritesItsInput()).eval()
    x, calib, train = X.clone(), [c.clone() for c in CALIB], [(c.clone(), torch.zeros(4, 4, 8, 8)) for c in CALIB]
    result = fxc.compile(model, x, [{"pass": "quantize"}, ], calibration_data=calib)
    fxc.compile(model, x, [{"pass": "finetune", "loss": "mse", "epochs": 1}], train_data=train)
    assert torch.equal(x, X) and all(torch.equal(a, b) for a, b in zip(calib, CALIB))
    assert all(torch.equal(a, b) for (a, _), b in zip(train, CALIB))
    assert result.trace.copied_inputs == ("x",)
    y = X.clone()
    result.module(y)
    assert torch.equal(y, X)  # the compiled module copies the input it writes to


# ---- errors that say what to do -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_asked_to_be_float32(dtype):
    with pytest.raises(InputError, match=rf"is {dtype}; fxcompress compiles float32.*model.float\(\)"):
        fxc.compile(_net().to(dtype), X.to(dtype), [{"pass": "fold_bn"}])


def test_float64_models_fold_and_prune_exactly_and_quantization_asks_for_float32():
    model, x = _net().double(), X.double()
    for recipe in ([{"pass": "fold_bn"}], [{"pass": "prune", "ratio": 0.25}]):
        assert fxc.compile(model, x, recipe).module(x).dtype == torch.float64
    with pytest.raises(InputError, match="computes in float64.*model.float"):
        fxc.compile(model, x, [{"pass": "quantize"}], calibration_data=[x])
    with pytest.raises(InputError, match="mixes floating-point dtypes"):
        fxc.compile(_net(), x, [{"pass": "fold_bn"}])


def test_one_shot_iterators_are_refused_with_what_to_pass():
    for key in ("calibration_data", "train_data"):
        with pytest.raises(InputError, match=rf"{key} is a generator, which can be read only once.*list"):
            fxc.compile(_net(), X, [{"pass": "fold_bn"}], **{key: (c for c in CALIB)})


def test_all_zero_calibration_is_a_valid_zero_range():
    zeros = torch.zeros(2, 3, 8, 8)
    result = fxc.compile(_net(), zeros, [{"pass": "quantize"}], calibration_data=[zeros])
    with torch.no_grad():
        assert torch.isfinite(result.module(X)).all()
        assert torch.allclose(result.module(zeros), _net()(zeros), atol=0.01)


def test_calibration_data_on_another_scale_is_an_error():
    with pytest.raises(InputError, match="factor of .* apart.*preprocessed as the model's inputs"):
        fxc.compile(_net(), X, [{"pass": "quantize"}], calibration_data=[c.abs() * 255 for c in CALIB])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script
def test_wrapped_and_weightless_models_are_named():
    model = _net()
    cases = [(torch.jit.script(model), "TorchScript module.*original nn.Module"),
             (_net().to("meta"), "meta device.*load the weights"),
             (torch.compile(model), "torch.compile returns.*_orig_mod")]
    for wrapped, match in cases:
        with pytest.raises(InputError, match=match):
            fxc.compile(wrapped, X, [{"pass": "fold_bn"}])

    class KeywordOnly(nn.Module):
        def forward(self, *, x):
            return x

    with pytest.raises(InputError, match="keyword-only.*by name"):
        fxc.compile(KeywordOnly(), X, [{"pass": "fold_bn"}])
    assert torch.equal(fxc.trace(KeywordOnly(), {"x": X})(X), X)  # given by name, it traces


def test_export_to_an_unwritable_path_says_so(tmp_path):
    result = fxc.compile(_net(), X, [{"pass": "fold_bn"}])
    with pytest.raises(fxc.ExportError, match="cannot write '/proc/no/m.onnx'"):
        result.export_onnx("/proc/no/m.onnx")
    with pytest.raises(fxc.ExportError, match="is a directory"):
        result.export_onnx(tmp_path)


def test_a_lowering_past_its_bound_says_what_usually_causes_it():
    with pytest.raises(fxc.VerificationError, match="hint: .*calibration data does not look like the example"):
        fxc.compile(_net(), X, [{"pass": "quantize", "max_error": 1e-6}], calibration_data=CALIB)


def test_dead_code_elimination_keeps_writes_in_place():
    class AddsInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            y.add_(1)  # the result is unused, the write is not
            return F.relu(y)

    model = randomize_bn(AddsInPlace()).eval()
    for recipe in ([{"pass": "fold_bn"}], [{"pass": "prune", "ratio": 0.5}]):
        result = fxc.compile(model, X, recipe)
        assert "add_" in result.module.code


# ---- what a user reads ----------------------------------------------------------------------------------------

def test_printing_plans_gives_one_summary_line_each():
    result = fxc.compile(_net(), X, [{"pass": "prune", "ratio": 0.25, "mode": "mask"}, {"pass": "quantize"}],
                         calibration_data=CALIB)
    text = str(result.plans)
    assert text.count("\n") == len(result.plans) - 1 and "tensor(" not in text
    assert "quant_params: QuantParams(3 entries" in text and "pruning_plan: PruningPlan(" in text


def test_progress_writes_lines_to_logs(capsys):
    from fxcompress.progress import progress

    with progress(3, "calibrate", "batch", None, interval=0.0) as bar:  # stderr is not a terminal under pytest
        for _ in range(3):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[fxcompress] calibrate: 1/3 batch")
    assert lines[-1].startswith("[fxcompress] calibrate: 3/3")
    with progress(3, "calibrate", "batch", False, interval=0.0) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_a_model_in_the_current_directory_loads_from_the_console_script(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "import torch, torch.nn as nn\n"
        "def make():\n    return nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), (torch.randn(1, 4),)\n")
    done = subprocess.run([sys.executable, "-c", "import sys; from fxcompress.cli import main; "
                           "sys.exit(main(['inspect', 'mymodel:make']))"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "total" in done.stdout
