"""Outputs keep the model's own containers: an OrderedDict (torchvision's segmentation models), a namedtuple, a
dataclass, a registered dict subclass (Hugging Face's ModelOutput), nested in plain containers; through exact
passes, pruning, save -> load and ONNX export."""
from __future__ import annotations

import collections
import dataclasses
import subprocess
import sys
import textwrap

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

import fxcompress as fxc

Pair = collections.namedtuple("Pair", "logits features")


@dataclasses.dataclass
class Result:
    logits: torch.Tensor
    aux: torch.Tensor | None = None


class Output(collections.OrderedDict):
    """A dict subclass registered with pytree, as transformers registers its ModelOutput classes."""


pytree.register_pytree_node(Output, lambda o: (list(o.values()), list(o.keys())),
                            lambda values, keys: Output(zip(keys, values)),
                            serialized_type_name=f"{__name__}.Output")


class Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        f = self.conv2(self.bn(self.conv(x)).relu()).relu()
        y = self.fc(f.mean((2, 3)))
        return {
            "ordered": lambda: collections.OrderedDict(out=y, aux=f),
            "namedtuple": lambda: Pair(y, f),
            "dataclass": lambda: Result(y),
            "registered": lambda: Output(logits=y, hidden=f),
            "nested": lambda: {"a": collections.OrderedDict(x=y), "b": [f, Pair(y, f)], "c": None},
        }[self.kind]()


KINDS = ("ordered", "namedtuple", "dataclass", "registered", "nested")


def _same(a, b, exact: bool = False) -> None:
    """Same containers (classes, keys) and leaves."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb, (sa, sb)
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y) if exact else torch.allclose(x, y, atol=1e-5), (x - y).abs().max()
        else:
            assert x == y


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_keep_the_models_containers_through_passes_and_save_load(kind, tmp_path):
    torch.manual_seed(0)
    model = Net(kind).eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxc.compile(model, (x,), [{"pass": "fold_bn"}])
    _same(result.module(x), model(x))
    path = result.save(tmp_path / "m.pt")
    loaded = fxc.load(path, allow=[Pair, Result, Output])
    _same(loaded(x), result.module(x), exact=True)
    pruned = fxc.compile(model, (x,), [{"pass": "prune", "ratio": 0.5, "mode": "remove"}])
    out = pruned.module(x)
    assert pytree.tree_structure(out) == pytree.tree_structure(model(x))
    assert pruned.after.macs < pruned.before.macs


class WithOptions(Net):
    """A forward as Hugging Face writes it: options with defaults and ``**kwargs`` after the input."""

    def forward(self, x, output_hidden_states=None, return_dict=None, **kwargs):
        return super().forward(x)


def test_a_forward_with_defaults_and_kwargs_keeps_its_signature_and_containers(tmp_path):
    torch.manual_seed(0)
    model = WithOptions("registered").eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxc.compile(model, (x,), [{"pass": "fold_bn"}])
    assert result.trace.front_end == "fx"
    _same(result.module(x), model(x))
    loaded = fxc.load(result.save(tmp_path / "m.pt"), allow=[Output])
    _same(loaded(x), result.module(x), exact=True)


def test_an_ordered_dict_model_exports_to_onnx_and_runs_in_ort(tmp_path):
    torch.manual_seed(0)
    model = Net("ordered").eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxc.compile(model, (x,), [{"pass": "fold_bn"}])
    session = ort.InferenceSession(str(result.export_onnx(tmp_path / "m.onnx")))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    want = model(x)
    for g, w in zip(got, want.values()):
        assert torch.allclose(torch.from_numpy(g), w, atol=1e-4)


def test_a_saved_namedtuple_output_loads_in_a_fresh_process_only_when_allowed(tmp_path):
    """A fresh process has not registered the class with pytree: fxc.load imports it through allow= and registers
    it; without allow= the class is refused by name."""
    module = tmp_path / "outputs_mod.py"
    module.write_text(textwrap.dedent("""
        import collections, torch, torch.nn as nn
        Pair = collections.namedtuple("Pair", "logits features")
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3)
            def forward(self, x):
                f = self.conv(x)
                return Pair(f.mean((2, 3)), f)
    """))
    save = textwrap.dedent(f"""
        import sys, torch, fxcompress as fxc
        sys.path.insert(0, {str(tmp_path)!r})
        from outputs_mod import Net
        torch.manual_seed(0)
        x = torch.randn(1, 3, 8, 8)
        result = fxc.compile(Net(), (x,), [{{"pass": "fold_bn"}}])
        result.save({str(tmp_path / 'm.pt')!r})
        torch.save(result.module(x).logits, {str(tmp_path / 'y.pt')!r})
    """)
    load = textwrap.dedent(f"""
        import sys, torch, fxcompress as fxc
        sys.path.insert(0, {str(tmp_path)!r})
        from outputs_mod import Pair
        torch.manual_seed(0)
        x = torch.randn(1, 3, 8, 8)
        try:
            fxc.load({str(tmp_path / 'm.pt')!r})
        except fxc.FxCompressError as exc:
            assert "outputs_mod.Pair" in str(exc) and "allow" in str(exc), exc
        else:
            raise AssertionError("loaded without allow=")
        out = fxc.load({str(tmp_path / 'm.pt')!r}, allow=[Pair])(x)
        assert type(out) is Pair and torch.equal(out.logits, torch.load({str(tmp_path / 'y.pt')!r}))
    """)
    for script in (save, load):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]


class PlainDictSubclass(dict):
    pass


def test_a_container_pytree_does_not_know_is_a_clear_error():
    class Net2(nn.Module):
        def forward(self, x):
            return PlainDictSubclass(out=x.relu())
    with pytest.raises(fxc.TracingError, match="PlainDictSubclass.*register_pytree_node"):
        fxc.trace(Net2(), (torch.randn(2, 3),))
