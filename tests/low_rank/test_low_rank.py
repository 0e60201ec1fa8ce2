"""low_rank_svd: exact at full rank, spectral error sigma_(k+1) at rank k, rank choice, skips, data-aware SVD,
and prune -> low_rank -> quantize exported to ONNX Runtime."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zoo
from fxcompress.passes.low_rank.low_rank_svd import (
    LowRankPlan,
    allocate,
    apply_layer,
    candidates,
    decompose,
    factorize,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcompress as fxc
from fxcompress.counting import totals
from fxcompress.export.ort import run as ort_run
from fxcompress.instruments import sqnr_db


def _outputs(module, inputs):
    with torch.no_grad():
        return module(*inputs)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_full_rank_replacement_is_exact(name):
    model, inputs = zoo.build(name)
    gm = fxc.trace(model, inputs)
    want = _outputs(gm, inputs)
    found, _ = candidates(gm)
    for c in found:
        decompose(c)
        apply_layer(gm, c, c.full_rank)
    gm.graph.lint()
    gm.recompile()
    got = _outputs(gm, inputs)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        if w.is_floating_point():
            assert float((g - w).abs().max()) <= 1e-5 * max(1.0, float(w.abs().max()))
        else:
            assert torch.equal(g, w)
    assert all(isinstance(gm.get_submodule(c.name), nn.Sequential) for c in found)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), seed=st.integers(0, 10_000), data=st.data())
def test_rank_k_spectral_error_is_the_next_singular_value(rows, cols, seed, data):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    k = data.draw(st.integers(1, min(rows, cols)))
    a, b = factorize(w, k)
    assert a.shape == (k, cols) and b.shape == (rows, k)
    error = float(torch.linalg.matrix_norm(w - b @ a, ord=2))
    expected = float(s[k]) if k < len(s) else 0.0
    assert error == pytest.approx(expected, rel=1e-9, abs=1e-9 * float(s[0]))


@settings(max_examples=15, deadline=None)
@given(cin=st.integers(1, 6), cout=st.integers(1, 8), k=st.sampled_from([1, 3]), seed=st.integers(0, 1000),
       data=st.data())
def test_conv_factors_compute_the_truncated_weight(cin, cout, k, seed, data):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=True).double()
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64)
    gm = fxc.trace(model, (x,))
    (c,), _ = candidates(gm)
    decompose(c)
    rank = data.draw(st.integers(1, c.full_rank))
    a, b = factorize(conv.weight.detach().reshape(cout, -1), rank)
    apply_layer(gm, c, rank)
    gm.recompile()
    truncated = F.conv2d(x, (b @ a).reshape(conv.weight.shape), conv.bias, padding=k // 2)
    torch.testing.assert_close(gm(x), truncated, rtol=1e-9, atol=1e-9)


class _Mlp(nn.Module):
    """Two Linear layers on tokens, one of them exactly rank 2, plus a shared layer called twice."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.low = nn.Linear(32, 32)
        with torch.no_grad():
            self.low.weight.copy_(torch.randn(32, 2, generator=g) @ torch.randn(2, 32, generator=g))
        self.full = nn.Linear(32, 32)
        self.shared = nn.Linear(32, 32)

    def forward(self, x):
        return self.shared(self.full(self.shared(self.low(x))))


def test_energy_rank_ratio_and_shared_module():
    model, x = _Mlp().eval(), torch.randn(3, 5, 32)
    result = fxc.compile(model, (x,), [{"pass": "low_rank", "energy": 0.999}])
    stats = result.history[-1].stats
    assert stats["layers_replaced"] >= 1
    gm = result.module
    assert isinstance(gm.get_submodule("low"), nn.Sequential) and gm.get_submodule("low")[0].out_features == 2
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"].count("shared.0") in (0, 2)
    want = _outputs(model, (x,))
    torch.testing.assert_close(_outputs(gm, (x,)), want, rtol=0.05, atol=0.05 * float(want.abs().max()))
    ratio = fxc.compile(model, (x,), [{"pass": "low_rank", "rank_ratio": 0.25}])
    ranks = {n.target: ratio.module.get_submodule(n.target).out_features
             for n in ratio.module.graph.nodes if n.op == "call_module" and n.target.endswith(".0")}
    assert ranks == {"low.0": 8, "full.0": 8, "shared.0": 8}
    assert sum(1 for n in ratio.module.graph.nodes if n.target == "shared.0") == 2


def test_target_spends_energy_where_it_is_cheapest():
    model, x = _Mlp().eval(), torch.randn(3, 5, 32)
    before = totals(fxc.trace(model, (x,))).macs
    result = fxc.compile(model, (x,), [{"pass": "low_rank", "target": 0.8}])
    after = totals(result.module).macs
    assert after <= 0.8 * before
    low = result.module.get_submodule("low")
    assert isinstance(low, nn.Sequential) and low[0].out_features == 2  # free: no energy lost
    assert not isinstance(result.module.get_submodule("full"), nn.Sequential)  # 0.8 is reached without it
    assert result.history[-1].stats["min_energy"] == pytest.approx(1.0)


def test_allocate_follows_the_convex_hull():
    model, x = _Mlp().eval(), torch.randn(3, 5, 32)
    gm = fxc.trace(model, (x,))
    found, _ = candidates(gm)
    for c in found:
        decompose(c)
    whole = sum(c.macs(None) for c in found)
    ranks = allocate(found, whole, 0.0, "macs")  # unreachable: every layer goes down to rank 1
    assert ranks == {c.name: 1 for c in found}
    loose = allocate(found, whole, whole * 0.99, "params")
    assert list(loose) == ["low"]


EXPECTED_SKIPS = {  # zoo model -> skip reasons that must appear
    "grouped_depthwise": {"grouped"},
    "transposed": {"transposed"},
    "attention": {"attention"},
    "functional": {"functional"},
}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_zoo_model_compresses_or_says_why(name):
    model, inputs = zoo.build(name)
    result = fxc.compile(model, inputs, [{"pass": "low_rank", "energy": 0.8}])
    record = result.history[-1]
    stats = record.stats
    skipped = sum(v for k, v in stats.items() if k.startswith("skipped_"))
    assert stats["layers_seen"] == stats["layers_replaced"] + skipped
    assert len([n for n in record.notes if ", energy " not in n]) >= skipped
    for reason in EXPECTED_SKIPS.get(name, ()):
        assert stats[f"skipped_{reason}"] >= 1
    if stats["layers_replaced"]:
        assert totals(result.module).macs < totals(fxc.trace(model, inputs)).macs
        assert math.isfinite(stats["output_sqnr_db"])
        out = _outputs(result.module, inputs)
        assert all(torch.isfinite(t).all() for t in torch.utils._pytree.tree_leaves(out) if t.is_floating_point())


def test_excluded_layers_stay_and_model_is_untouched():
    model, inputs = zoo.build("residual")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxc.compile(model, inputs, [{"pass": "low_rank", "rank_ratio": 0.3, "exclude": ["fc"]}])
    assert not isinstance(result.module.get_submodule("fc"), nn.Sequential)
    assert result.history[-1].stats["skipped_excluded"] == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("options, words", [
    ({"energy": 1.5}, "energy"),
    ({"energy": 0.9, "rank_ratio": 0.5}, "one of"),
    ({"target": 0.0}, "target"),
    ({"target": 0.5, "target_metric": "flops"}, "target_metric"),
    ({"max_samples": 0}, "max_samples"),
    ({"exclude": [3]}, "exclude"),
    ({"exclude": ["nope"]}, "matches no module"),
    ({"rank": 3}, "no option"),
    ({"ranks": {"fc": 0}}, "ranks"),
])
def test_bad_options_are_recipe_errors(options, words):
    model, inputs = zoo.build("residual")
    with pytest.raises(fxc.RecipeError, match=words):
        fxc.compile(model, inputs, [{"pass": "low_rank", **options}])


def test_data_aware_needs_calibration_data():
    model, inputs = zoo.build("residual")
    with pytest.raises(fxc.FxCompressError, match="calibration"):
        fxc.compile(model, inputs, [{"pass": "low_rank", "data_aware": True}])


@pytest.mark.parametrize("name", ["vgg-small-digits", "vit-tiny-digits"])
def test_data_aware_is_not_worse_at_the_same_ranks(name):
    model, example = fxc.golden.load(name)
    train, _ = fxc.golden.digits("train")
    images, _ = fxc.golden.digits("test")
    calib = [train[i:i + 32] for i in range(0, 256, 32)]
    reference = _outputs(model, (images,))
    sqnr = {}
    for aware in (False, True):
        result = fxc.compile(model, example, [{"pass": "low_rank", "rank_ratio": 0.3, "data_aware": aware}],
                             calibration_data=calib)
        assert result.history[-1].stats["layers_replaced"] >= 2
        sqnr[aware] = sqnr_db(reference, _outputs(result.module, (images,)))
    assert sqnr[True] >= sqnr[False]


def test_prune_low_rank_quantize_runs_in_onnx_runtime(tmp_path):
    model, example = fxc.golden.load("vgg-small-digits")
    train, _ = fxc.golden.digits("train")
    images, labels = fxc.golden.digits("test")
    calib = [train[i:i + 16] for i in range(0, 128, 16)]
    recipe = [{"pass": "fold_bn"}, {"pass": "prune", "ratio": 0.1, "criterion": "l1"},
              {"pass": "low_rank", "energy": 0.95}, {"pass": "quantize"}]
    result = fxc.compile(model, example, recipe, calibration_data=calib)
    names = [r.name for r in result.history]
    assert names.index("remove_channels") < names.index("low_rank_svd") < names.index("insert_observers")
    assert result.history[names.index("low_rank_svd")].stats["layers_replaced"] >= 1
    path = result.export_onnx(tmp_path / "m.onnx")
    got = ort_run(path, images)[0]
    sim = _outputs(result.module, (images,)).numpy()
    step = float(sim.max() - sim.min()) / 255
    assert float(np.abs(got - sim).max()) <= 3 * step
    labels = labels.numpy()
    assert np.mean(got.argmax(1) == labels) >= np.mean(sim.argmax(1) == labels) - 0.02
    assert np.mean(got.argmax(1) == labels) > 0.5  # 10% pruned without fine-tuning keeps most of 99.7%


def test_ranks_replay_a_plan_and_name_unknown_layers():
    model, inputs = zoo.build("residual")
    first = fxc.compile(model, inputs, [{"pass": "low_rank", "energy": 0.7}])
    plan = first.plans[LowRankPlan]
    ranks = {n.target[:-2]: first.module.get_submodule(n.target).weight.shape[0]
             for n in first.module.graph.nodes if n.op == "call_module" and n.target.endswith(".0")}
    assert ranks and {k: v.rank for k, v in plan.layers.items()} == ranks
    again = fxc.compile(model, inputs, [{"pass": "low_rank", "ranks": ranks}])
    torch.testing.assert_close(_outputs(again.module, inputs), _outputs(first.module, inputs), rtol=0, atol=0)
    with pytest.raises(fxc.RecipeError, match="not a layer"):
        fxc.compile(model, inputs, [{"pass": "low_rank", "ranks": {"nope": 2}}])


def test_an_unreachable_target_is_reported():
    model, x = _Mlp().eval(), torch.randn(3, 5, 32)
    result = fxc.compile(model, (x,), [{"pass": "low_rank", "target": 0.01}])
    record = result.history[-1]
    assert record.stats["target_share"] > 0.01
    assert any("not reached" in n for n in record.notes)
    assert all(result.module.get_submodule(n)[0].out_features == 1 for n in ("low", "full", "shared"))
