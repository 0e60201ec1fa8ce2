"""Save and load: ``result.save`` / ``fxc.load``, ``torch.save`` / ``torch.load`` and ``state_dict`` round trips give
bit-identical outputs for every pass and pipeline; loading runs no code from the file; quantization parameters are
state; the architecture of a pruned model travels in its state_dict."""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from zoo import ZOO, TiedEmbedding, build

import fxcompress as fxc
from fxcompress import persist
from fxcompress.errors import InputError

FAST = ["resnet20-hard-digits", "mobilenetv2-hard-digits", "vit-tiny-digits"]  # residual, depthwise, attention
OTHERS = [n for n in fxc.golden.names() if n not in FAST]
RECIPES = {
    "fold_bn": [{"pass": "fold_bn"}],
    "prune_remove": [{"pass": "prune", "ratio": 0.5}],
    "prune_mask": [{"pass": "prune", "ratio": 0.5, "mode": "mask"}],
    "low_rank": [{"pass": "low_rank", "rank_ratio": 0.5}],
    "quantize": [{"pass": "quantize"}],
    "prune_quantize": [{"pass": "prune", "ratio": 0.3}, {"pass": "quantize", "activation_observer": "minmax"}],
    "quantize_dynamic": [{"pass": "quantize", "mode": "dynamic"}],
    "qat": [{"pass": "fold_bn"}, {"pass": "insert_observers", "weight_bits": 4}, {"pass": "calibrate"},
            {"pass": "qat", "epochs": 1, "max_steps": 2}, {"pass": "lower_quantized"}],
}


def _digits(name: str, start: int, count: int) -> torch.Tensor:
    if not name.endswith("-digits"):  # an ImageNet-layout golden model: seeded inputs of its example's shape
        _, (example,) = fxc.golden.load(name)
        return torch.randn((count, *example.shape[1:]), generator=torch.Generator().manual_seed(start))
    images, _ = fxc.golden.digits("train", hard=name.endswith("-hard-digits"))
    return images[start:start + count]


def _compile(name: str, recipe, calibration_start: int = 0):
    model, example = fxc.golden.load(name)
    size = 64 if name.endswith("-digits") else 8  # ImageNet-sized golden models: fewer, smaller batches
    images = _digits(name, calibration_start, size)
    calibration = [images[i:i + size // 4] for i in range(0, size, size // 4)]
    if name.endswith("-digits"):
        targets = torch.arange(size // 2) % 10
    else:  # any output shape (segmentation maps too): regress the model's own outputs
        with torch.no_grad():
            targets = model(images[:size // 2])
        recipe = [dict(step, loss="mse") if step["pass"] == "qat" else step for step in recipe]
    train = [(images[i:i + size // 4], targets[i:i + size // 4]) for i in range(0, size // 2, size // 4)]
    return fxc.compile(model, example, recipe, calibration_data=calibration, train_data=train)


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def _round_trips(result, tmp_path: Path, x: torch.Tensor) -> None:
    loaded = fxc.load(result.save(tmp_path / "model.pt"))
    assert isinstance(loaded, fxc.CompiledModule) and not loaded.training
    assert _same(loaded, result.module, x)
    assert type(loaded).__name__ == type(result.module).__name__
    buffer = io.BytesIO()
    torch.save(result.module, buffer)
    buffer.seek(0)
    assert _same(torch.load(buffer, weights_only=False), result.module, x)
    again = fxc.load(loaded.save(tmp_path / "again.pt"))  # a loaded module saves again
    assert _same(again, result.module, x)


def _check_recipe(name: str, recipe: str, tmp_path: Path) -> None:
    if recipe == "quantize_dynamic" and not name.startswith("vit"):
        pytest.skip("dynamic quantization is for Linear-heavy models")
    result = _compile(name, RECIPES[recipe])
    _round_trips(result, tmp_path, _digits(name, 500, 32 if name.endswith("-digits") else 2))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("name", FAST)
def test_every_pass_round_trips_bit_for_bit(name, recipe, tmp_path):
    _check_recipe(name, recipe, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("name", OTHERS)
def test_every_golden_model_round_trips_bit_for_bit(name, recipe, tmp_path):
    _check_recipe(name, recipe, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parents[2] / "recipes").glob("*.toml")))
def test_shipped_recipes_round_trip_bit_for_bit(recipe, tmp_path):
    name = "resnet18" if recipe == "prune.toml" else "resnet20-hard-digits"  # prune.toml keeps resnet's "fc"
    model, example = fxc.golden.load(name)
    train = fxc.golden.training_data(name) if name.endswith("-digits") else None
    result = fxc.compile(model, example, Path(__file__).parents[2] / "recipes" / recipe,
                         calibration_data=[_digits(name, i, 16) for i in range(0, 128, 16)], train_data=train)
    _round_trips(result, tmp_path, _digits(name, 500, 16))


@pytest.mark.parametrize("recipe", ["quantize", "prune_quantize", "fold_bn", "low_rank"])
def test_state_dict_into_a_same_recipe_compile_reproduces_the_outputs(recipe, tmp_path):
    name = "mobilenetv2-hard-digits"
    first = _compile(name, RECIPES[recipe])
    second = _compile(name, RECIPES[recipe], calibration_start=300)  # other calibration data: other scales
    x = _digits(name, 500, 32)
    if recipe.endswith("quantize"):
        assert not _same(first.module, second.module, x)
        scales = [k for k in first.module.state_dict() if k.startswith("qparams.") and k.endswith("_scale")]
        assert len(scales) > 40  # activation and weight scales, zero points: state
    second.module.load_state_dict(first.module.state_dict())
    assert _same(first.module, second.module, x)
    torch.save(first.module.state_dict(), tmp_path / "sd.pt")
    third = _compile(name, RECIPES[recipe], calibration_start=600)
    third.module.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert _same(first.module, third.module, x)


def test_a_state_dict_from_another_architecture_is_refused():
    name = "resnet20-digits"
    eight = _compile(name, [{"pass": "quantize", "activation_observer": "minmax"}])
    six = _compile(name, [{"pass": "quantize", "activation_observer": "minmax", "weight_bits": 6}])
    assert eight.module.state_dict().keys() == six.module.state_dict().keys()  # same keys, other integer ranges
    with pytest.raises(RuntimeError, match="another compiled architecture"):
        six.module.load_state_dict(eight.module.state_dict())


def test_a_pruned_architecture_is_rebuilt_from_its_state_dict_alone(tmp_path):
    result = _compile("resnet20-digits", [{"pass": "prune", "ratio": 0.5}])
    torch.save(result.module.state_dict(), tmp_path / "sd.pt")
    rebuilt = fxc.load(tmp_path / "sd.pt")
    assert rebuilt.conv1.out_channels == result.module.conv1.out_channels == 8
    assert _same(rebuilt, result.module, _digits("resnet20-digits", 0, 8))
    state = result.module.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # {k: v.clone()} and .to() keep working
    assert persist.ARCH_KEY in state and state[persist.ARCH_KEY].dtype == torch.uint8


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_architectures_round_trip(name, tmp_path):
    model, example = build(name)
    for recipe in ([{"pass": "fold_bn"}], [{"pass": "prune", "ratio": 0.25}]):
        result = fxc.compile(model, example, recipe)
        loaded = fxc.load(result.save(tmp_path / "m.pt"))
        with torch.no_grad():
            for a, b in zip(torch.utils._pytree.tree_leaves(loaded(*example)),
                            torch.utils._pytree.tree_leaves(result.module(*example))):
                assert torch.equal(a, b), name


def test_tied_frozen_and_non_persistent_state_survive(tmp_path):
    model = TiedEmbedding(8)
    model.proj.weight.requires_grad_(False)
    tokens = torch.randint(0, 20, (2, 5))
    result = fxc.compile(model, (tokens,), [{"pass": "fold_bn"}])
    loaded = fxc.load(result.save(tmp_path / "m.pt"))
    assert loaded.head.weight is loaded.embed.weight
    assert not loaded.proj.weight.requires_grad and loaded.proj.bias.requires_grad
    assert torch.equal(loaded.offset, model.offset)
    assert _same(loaded, result.module, tokens)


class _Opaque(nn.Module):
    """A leaf of the user's own class: fxc.load imports it only when the caller allows it."""

    def __init__(self):
        super().__init__()
        self.scale = 2.5

    def forward(self, x):
        return x * self.scale if x.sum() > 0 else x


def test_a_users_own_class_loads_only_when_allowed(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), _Opaque())
    x = torch.randn(3, 4)
    result = fxc.compile(model, (x,), [{"pass": "fold_bn"}], leaf_modules=[_Opaque])
    path = result.save(tmp_path / "m.pt")
    with pytest.raises(InputError, match="_Opaque.*allow="):
        fxc.load(path)
    assert _same(fxc.load(path, allow=[_Opaque]), result.module, x)


def test_loading_a_tampered_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({persist.ARCH_KEY: Payload()}, f, protocol=2)
    with pytest.raises(InputError, match="weights-only"):
        fxc.load(path)
    state = _compile("resnet20-digits", [{"pass": "fold_bn"}]).module.state_dict()
    torch.save({"x": Payload(), **state}, path)
    with pytest.raises(InputError, match="weights-only"):
        fxc.load(path)
    assert not marker.exists()


def _tamper(state: dict, edit) -> dict:
    arch = json.loads(bytes(state[persist.ARCH_KEY].numpy().tobytes()).decode())
    edit(arch)
    return {**state, persist.ARCH_KEY: persist._to_bytes(arch)}


def test_a_tampered_architecture_cannot_name_arbitrary_code(tmp_path):
    state = _compile("resnet20-digits", [{"pass": "fold_bn"}]).module.state_dict()

    def call_system(arch):
        node = next(n for n in arch["root"]["graph"]["nodes"] if n[1] == "call_function")
        node[2] = {"~fn": "posix.system"}

    def popen_module(arch):
        arch["root"]["children"]["relu"]["class"] = "subprocess.Popen"

    def private_method(arch):
        node = next(n for n in arch["root"]["graph"]["nodes"] if n[1] == "call_function")
        node[1], node[2] = "call_method", "__reduce_ex__"

    def dunder_getattr(arch):
        nodes = arch["root"]["graph"]["nodes"]
        nodes.insert(1, ["peek", "call_function", {"~fn": "getattr"}, {"~tuple": [{"~node": nodes[0][0]}, "__class__"]},
                         {"~dict": []}])

    for edit, match in ((call_system, "posix.system"), (popen_module, "subprocess.Popen"),
                        (private_method, "not a public Tensor method"), (dunder_getattr, "private attribute")):
        torch.save(_tamper(state, edit), tmp_path / "t.pt")
        with pytest.raises(InputError, match=match):
            fxc.load(tmp_path / "t.pt")


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="is not a file"):
        fxc.load(tmp_path / "missing.pt")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(InputError, match="not a saved fxcompress module"):
        fxc.load(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot be read"):
        fxc.load(tmp_path / "junk.pt")
    result = _compile("resnet20-digits", [{"pass": "fold_bn"}])
    with pytest.raises(InputError, match="cannot write"):
        result.save("/proc/forbidden/m.pt")
    state = result.module.state_dict()
    del state["conv1.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(InputError, match="conv1.weight"):
        fxc.load(tmp_path / "partial.pt")
    with zipfile.ZipFile(result.save(tmp_path / "ok.pt")) as z:  # a plain torch.save zip file, nothing else
        assert any(n.endswith("data.pkl") for n in z.namelist())


def test_a_quantized_reproducer_module_loads(tmp_path):
    from fxcompress.pass_base import Contract, Pass

    class Broken(Pass):
        name = "broken"
        contract = Contract.EXACT

        def run(self, ctx):
            raise RuntimeError("boom")

    model, example = fxc.golden.load("resnet20-digits")
    with pytest.raises(fxc.PassError, match="reproducer: (.*)") as info:
        pm = fxc.PassManager([{"pass": "quantize"}, Broken()], reproducer_dir=tmp_path)
        ctx = pm.context(model, example, [_digits("resnet20-digits", 0, 16)], eval_mode=True)
        pm.run(ctx)
    where = Path(str(info.value).split("reproducer: ")[1].splitlines()[0])
    module = torch.load(where / "module.pt", weights_only=False)
    assert _same(module, ctx.gm, example[0])
    assert _same(fxc.load(where / "state_dict.pt"), ctx.gm, example[0])
