"""The plan registry: typed plans with owners and lifetimes, made on request, saved, loaded and replayed."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import zoo
from fxcompress.passes import PASSES
from fxcompress.passes.low_rank.low_rank_svd import LowRankPlan
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.select_channels import PruningPlan
from fxcompress.passes.quant.fold_bn import FoldedBNs
from fxcompress.passes.quant.lib.quant_plan import QuantPlan
from fxcompress.passes.quant.lib.quant_spec import QuantParams
from fxcompress.passes.quant.lower_quantized import BiasCorrections

import fxcompress as fxc
from fxcompress import plans
from fxcompress.pass_base import Contract, Pass, PassResult


def _outputs(module, inputs):
    with torch.no_grad():
        return module(*inputs)


def _calibration(inputs, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(t + 0.3 * torch.randn(t.shape, generator=g) for t in inputs) for _ in range(n)]


def test_every_pass_declares_registered_types_and_every_type_names_its_owner():
    made = {}
    for name, cls in PASSES.items():
        p = cls()  # preserves and writes_tensors may depend on the options
        for kind in (*p.requires, *p.uses, *p.produces, *p.preserves):
            assert isinstance(kind, type) and issubclass(kind, plans.Artifact), (name, kind)
            assert plans.KINDS[kind.kind] is kind
        for kind in cls.produces:
            made.setdefault(kind, []).append(name)
    for kind in plans.KINDS.values():
        if kind.__module__.startswith("fxcompress.passes"):
            assert kind.owner in made.get(kind, []), f"{kind.kind}: owner {kind.owner} does not produce it"
        if kind.lifetime in (plans.Lifetime.DECISION, plans.Lifetime.RESULT):
            assert dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen, kind
            assert "graph" in {f.name for f in dataclasses.fields(kind)}, kind
    assert {PruningPlan, QuantPlan, LowRankPlan, QuantParams} <= {
        k for k in plans.KINDS.values() if k.lifetime in (plans.Lifetime.DECISION, plans.Lifetime.RESULT)}
    assert ChannelGraph.lifetime is plans.Lifetime.ANALYSIS and FoldedBNs.lifetime is plans.Lifetime.ON_REQUEST


def test_a_store_keeps_each_plan_under_its_own_type():
    store = plans.Store()
    plan = PruningPlan("l1", {"a": (0,)}, {"a": 4})
    store[PruningPlan] = plan
    assert store["pruning_plan"] is plan and store.get(QuantPlan) is None and PruningPlan in store
    with pytest.raises(fxc.PassError, match="own registered type"):
        store[QuantPlan] = plan
    with pytest.raises(KeyError, match="low_rank_svd makes it"):
        store[LowRankPlan]
    with pytest.raises(KeyError, match="known kinds"):
        store["pruning_plans"]
    assert str(store).startswith("pruning_plan: PruningPlan(l1: remove 1 of 4 channels in 1 groups)")


class UsesFoldRecords(Pass):
    name = "uses_fold_records"
    contract = Contract.EXACT
    uses = (FoldedBNs,)

    def run(self, ctx):
        return PassResult(modified=False, stats={"records": len(ctx.plans.get(FoldedBNs, ()))})


def test_fold_records_are_made_only_when_a_later_pass_uses_them():
    model, inputs = zoo.build("residual")
    alone = fxc.compile(model, inputs, [{"pass": "fold_bn"}])
    assert alone.history[0].stats["bn_folded"] > 0 and FoldedBNs not in alone.plans
    wanted = fxc.compile(model, inputs, [{"pass": "fold_bn"}, UsesFoldRecords()])
    assert wanted.history[-1].stats["records"] == alone.history[0].stats["bn_folded"]
    torch.testing.assert_close(_outputs(wanted.module, inputs), _outputs(alone.module, inputs), rtol=0, atol=0)


def test_a_saved_pruning_plan_replays_without_scoring_again(tmp_path):
    model, inputs = zoo.build("residual")
    recipe = [{"pass": "prune", "criterion": "taylor", "ratio": 0.4}]
    first = fxc.compile(model, inputs, recipe, calibration_data=_calibration(inputs))
    path = fxc.save_plans(first.plans, tmp_path / "plans.pt")
    loaded = fxc.load_plans(path)
    assert loaded[PruningPlan] == first.plans[PruningPlan] and loaded[PruningPlan].graph
    # taylor needs calibration data to score; the replay has none and needs none
    again = fxc.compile(model, inputs, recipe, plans=loaded)
    record = next(r for r in again.history if r.name == "select_channels")
    assert record.stats["replayed"] is True
    torch.testing.assert_close(_outputs(again.module, inputs), _outputs(first.module, inputs), rtol=0, atol=0)
    assert again.after.params == first.after.params < first.before.params


def test_a_plan_for_another_graph_is_refused(tmp_path):
    model, inputs = zoo.build("residual")
    plan = fxc.compile(model, inputs, [{"pass": "prune", "ratio": 0.5}]).plans[PruningPlan]
    other, other_inputs = zoo.build("concat")
    with pytest.raises(fxc.InputError, match="made for another graph"):
        fxc.compile(other, other_inputs, [{"pass": "prune", "ratio": 0.5}], plans=[plan])
    with pytest.raises(fxc.InputError, match="no pass of the pipeline"):
        fxc.compile(model, inputs, [{"pass": "fold_bn"}], plans=[plan])
    with pytest.raises(fxc.InputError, match="plan objects"):
        fxc.compile(model, inputs, [{"pass": "prune"}], plans=[{"a": 1}])


def test_quantization_plans_and_scales_replay_bit_for_bit(tmp_path):
    model, inputs = zoo.build("residual")
    calibration = _calibration(inputs)
    recipe = [{"pass": "quantize", "activation_observer": "mse"}]
    first = fxc.compile(model, inputs, recipe, calibration_data=calibration)
    loaded = fxc.load_plans(fxc.save_plans(first.plans, tmp_path / "q.pt"))
    assert set(dict(loaded.items())) == {"quant_plan", "quant_params", "bias_corrections"}
    for name, fq in first.plans[QuantParams].items():
        assert torch.equal(loaded[QuantParams][name].scale, fq.scale)
    corrections = loaded[BiasCorrections]
    assert len(corrections) == first.history[-1].stats["biases_corrected"] > 0
    assert all(torch.equal(c, first.plans[BiasCorrections][n]) for n, c in corrections.items())
    again = fxc.compile(model, inputs, recipe, plans=loaded)  # no data: every decision and measurement is given
    stats = {r.name: r.stats for r in again.history}
    assert stats["insert_observers"]["replayed"] and stats["calibrate"]["replayed"]
    assert stats["lower_quantized"]["replayed"] and stats["lower_quantized"]["biases_corrected"] == len(corrections)
    torch.testing.assert_close(_outputs(again.module, inputs), _outputs(first.module, inputs), rtol=0, atol=0)


def test_a_data_aware_low_rank_plan_replays_its_ranks(tmp_path):
    model, inputs = zoo.build("residual")
    calibration = _calibration(inputs)
    recipe = [{"pass": "low_rank", "target": 0.7, "data_aware": True}]
    first = fxc.compile(model, inputs, recipe, calibration_data=calibration)
    loaded = fxc.load_plans(fxc.save_plans(first.plans, tmp_path / "lr.pt"))
    assert loaded[LowRankPlan] == first.plans[LowRankPlan]
    again = fxc.compile(model, inputs, [{"pass": "low_rank"}], calibration_data=calibration, plans=loaded)
    assert again.history[-1].stats["replayed"]
    torch.testing.assert_close(_outputs(again.module, inputs), _outputs(first.module, inputs), rtol=0, atol=0)


def test_a_plans_file_holds_only_plain_data(tmp_path):
    model, inputs = zoo.build("residual")
    result = fxc.compile(model, inputs, [{"pass": "prune", "ratio": 0.5}])
    path = fxc.save_plans(result.plans, tmp_path / "p.pt")
    raw = torch.load(path, weights_only=True)  # no pickled classes
    assert raw["format"] == plans.FORMAT and raw["plans"][0]["__class__"] == "PruningPlan"
    torch.save({"format": "something else"}, tmp_path / "bad.pt")
    with pytest.raises(fxc.InputError, match="not a plans file"):
        fxc.load_plans(tmp_path / "bad.pt")
