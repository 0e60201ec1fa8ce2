"""Width plans and their search: the width space predicts exactly what remove_channels leaves, select_channels
honours per-group targets, and the strategies meet their budgets with their defining behaviour."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from fxcompress.passes.pruning.lib import amc, latency, latency_model, width_search
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.lib.plan_quality import PlanQuality, sqnr_db
from fxcompress.passes.pruning.lib.width_space import (
    PruningTargets,
    WidthSpace,
    candidate_groups,
)
from fxcompress.passes.pruning.select_channels import SCORERS
from fxcompress.passes.train.lib import bn_stats
from zoo import build

import fxcompress as fxc
from fxcompress import counting, meta
from fxcompress.cli import main
from fxcompress.plans import graph_signature

ARCHS = ["residual", "concat", "grouped_depthwise", "functional", "linear_bn", "attention", "shufflenet",
         "splits_views"]


def space_of(gm, round_to=1):
    cg = ChannelGraph(gm)
    groups = candidate_groups(cg)
    return cg, WidthSpace(cg, SCORERS["l1"](cg, None, {}), latency.layer_shapes(gm), groups, round_to)


def _random_plan(space, rng):
    return [int(rng.choice(lv)) for lv in space.levels]


def _activation_elements(gm, skip):
    total = 0
    for node in gm.graph.nodes:
        info = meta.tensor_info(node) if node.op.startswith("call_") else None
        if info is not None and info.shape and node.name not in skip:
            total += int(np.prod(info.shape))
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_the_width_space_predicts_what_remove_channels_leaves(arch):
    model, x = build(arch)
    gm = fxc.trace(model, x)
    cg, space = space_of(gm)
    rng = np.random.default_rng(0)
    n_params = sum(p.numel() for p in gm.parameters())
    checked = 0
    for _ in range(12):
        plan = _random_plan(space, rng)
        pruned = latency_model.pruned(gm, x, latency_model.targets(space, plan, graph_signature(gm)))
        real = {n: (s.cin, s.cout) for n, s in latency.layer_shapes(pruned).items() if n in space.shapes}
        if space.empties(plan):  # select_channels gave an emptied space a channel back: wider than the plan
            assert space.macs(plan) == space.params(plan) == np.inf
            assert any(real[n][0] > w[0] or real[n][1] > w[1] for n, w in space.widths(plan).items())
            continue
        checked += 1
        assert space.widths(plan) == real
        assert space.params(plan) == pytest.approx(sum(p.numel() for p in pruned.parameters()) / n_params, abs=1e-9)
        skip = set(space.shapes)
        assert space.volume(plan) == pytest.approx(_activation_elements(pruned, skip) / _activation_elements(gm, skip),
                                                   rel=1e-9)
        layers_macs = sum(s.macs for n, s in latency.layer_shapes(pruned).items() if n in space.shapes)
        assert space.macs(plan) == pytest.approx(layers_macs / sum(s.macs for s in space.shapes.values()))
    assert checked >= 3


def test_levels_honour_blocks_round_to_and_min_channels():
    model, x = build("grouped_depthwise")
    gm = fxc.trace(model, x)
    cg, space = space_of(gm, round_to=4)
    for grp, lv in zip(space.groups, space.levels):
        assert lv[0] == 0 and all(grp.size - k >= 1 for k in lv)
        assert all((grp.size - k) % 4 == 0 for k in lv[1:])
        if grp.blocks is not None:
            nb = int(grp.blocks.max()) + 1
            assert all(k % nb == 0 for k in lv)


def test_select_channels_removes_exactly_the_targets_lowest_scores_first():
    model, x = build("residual")
    gm = fxc.trace(model, x)
    cg, space = space_of(gm)
    plan = [lv[len(lv) // 2] for lv in space.levels]
    targets = latency_model.targets(space, plan, graph_signature(gm))
    pm = fxc.PassManager([{"pass": "propagate_dependencies"}, {"pass": "select_channels"}])
    ctx = pm.resume(gm, x, plans=[targets])
    pm.run(ctx)
    chosen = ctx.plans["pruning_plan"]
    scores = SCORERS["l1"](cg, None, {})
    for grp, k in zip(space.groups, plan):
        removed = chosen.removed[grp.name]
        assert len(removed) == k
        kept = [i for i in range(grp.size) if i not in removed and bool(grp.prunable[i])]
        if removed and kept:
            s = scores[grp.units]
            assert float(s[list(removed)].max()) <= float(s[kept].min()) + 1e-6
    wrong = PruningTargets(dict(targets.removed), dict(targets.sizes), "another graph")
    ctx = pm.resume(gm, x, plans=[wrong])
    with pytest.raises(fxc.RecipeError, match="another graph"):
        pm.run(ctx)


@pytest.mark.parametrize("budget,match", [
    ({"latency": -0.5}, "0 < latency <= 1"), ({"latency": 0}, "0 < latency <= 1"), ({"macs": 1.5}, "macs"),
    ({"latency_ms": 0}, "positive"), ({"flops": 0.5}, "unknown budget 'flops'"), (0.5, "dict"),
    ({"latency": 0.5, "macs": 0.5}, "one of"), ({"params": "half"}, "number"),
])
def test_bad_budgets_are_named(budget, match):
    model, x = build("residual")
    with pytest.raises(fxc.RecipeError, match=match):
        fxc.compile(model, x, [{"pass": "auto_prune", "budget": budget}])


def test_bad_options_of_auto_prune_are_named():
    model, x = build("residual")
    for options, match in [({"ratio": 0.5}, "no option 'ratio'"), ({"strategy": "greedy"}, "unknown strategy"),
                           ({"runtime": "tensorrt"}, "runtime"), ({"threads": 0}, "threads")]:
        with pytest.raises(fxc.RecipeError, match=match):
            fxc.compile(model, x, [{"pass": "auto_prune", "budget": {"macs": 0.5}, **options}])


@pytest.mark.parametrize("arch", ["residual", "concat", "grouped_depthwise"])
@pytest.mark.parametrize("kind", ["macs", "params"])
def test_auto_prune_meets_a_mac_or_parameter_budget(arch, kind):
    model, x = build(arch)
    result = fxc.compile(model, x, [{"pass": "auto_prune", "budget": {kind: 0.5}}])
    names = [r.name for r in result.history]
    assert names == ["propagate_dependencies", "search_widths", "select_channels", "remove_channels"]
    stats = result.history[1].stats
    assert stats[kind] <= 0.5
    if kind == "params":
        assert result.after.params <= 0.5 * result.before.params + 1
    else:
        gm, pruned = fxc.trace(model, x), result.module
        before = sum(s.macs for s in latency.layer_shapes(gm).values())
        assert sum(s.macs for s in latency.layer_shapes(pruned).values()) <= 0.5 * before
    assert stats[kind] > 0.3  # the budget is used, not undershot far


def _problem(arch="residual", budget=0.5):
    model, x = build(arch)
    gm = fxc.trace(model, x)
    cg, space = space_of(gm)
    scores = SCORERS["l1"](cg, None, {})
    loss = width_search.share_loss(scores, space)
    return gm, cg, space, width_search.Problem(space, space.macs, budget, loss), x


@pytest.mark.parametrize("arch", ["residual", "concat", "attention"])
def test_the_knapsack_loses_less_than_uniform_at_the_same_budget(arch):
    for budget in (0.7, 0.5, 0.3):
        _, _, _, p, _ = _problem(arch, budget)
        knap, uni = width_search.knapsack(p), width_search.uniform(p)
        assert p.feasible(knap) and p.feasible(uni)
        assert width_search.estimated_loss(p, knap) <= width_search.estimated_loss(p, uni) + 1e-9


def test_the_knapsack_keeps_the_finalist_the_whole_plan_measures_best_when_the_additive_loss_misleads():
    _, _, space, p, _ = _problem("residual", 0.5)
    free = 0  # the additive loss calls emptying the first group free; on the whole plan it ruins the outputs
    p.loss[free] = np.zeros_like(p.loss[free])
    deepest = space.levels[free][-1]
    assert width_search.knapsack(p)[free] == deepest
    calls, alone = [], [loss.copy() for loss in p.loss]

    def joint(plan):
        calls.append(list(plan))
        additive = sum(loss[lv.index(k)] for loss, lv, k in zip(alone, space.levels, plan))
        return -additive - (10.0 if plan[free] == deepest else 0.0)
    p.joint, p.info = joint, {}
    plan = width_search.knapsack(p)
    assert plan[free] != deepest and p.feasible(plan) and plan in calls
    assert p.info["finalists"] > 1 and p.info["joint_quality"] == pytest.approx(joint(plan), abs=1e-4)


def test_uniform_plans_in_coarser_steps_are_finalists_the_whole_plan_may_prefer():
    _, _, space, p, _ = _problem("residual", 0.5)
    step = space.round_to * width_search.COARSER[-1]
    coarse = width_search.uniform(p, step)
    assert all(k == 0 or (g.size - k) % step == 0 for g, k in zip(space.groups, coarse)) and p.feasible(coarse)
    p.info = {}
    assert width_search.knapsack(p) != coarse  # on the additive loss alone another finalist wins

    def joint(plan):  # the whole plan's quality: best for the coarse uniform plan, worse the farther from it
        return -sum(abs(a - b) for a, b in zip(plan, coarse))
    p.joint, p.info = joint, {}
    assert width_search.knapsack(p) == coarse


def test_distortion_is_the_noise_each_group_adds_alone_and_charges_lost_outputs_steeply():
    gm, cg, space, _, x = _problem("residual")
    batches = [tuple(torch.rand_like(t) for t in x) for _ in range(2)]
    quality = PlanQuality(gm, cg, space, batches)
    loss = width_search.distortion(space, quality, evaluations=10 * len(space.groups))
    for g, (lv, curve) in enumerate(zip(space.levels, loss)):
        assert curve[0] == 0 and len(curve) == len(lv) and np.all(np.diff(curve) >= 0)
        full = space.full()
        alone = [10 ** (-v / 10) for plan, v in quality.cache.items()
                 if all(k == f for h, (k, f) in enumerate(zip(plan, full)) if h != g) and plan[g] != 0]
        assert lv[-1] in {plan[g] for plan in quality.cache}  # the fewest channels are always measured
        noise = max(alone)  # the curve is the running maximum of the measured noise
        expected = noise if noise <= width_search.SMALL_NOISE else \
            width_search.SMALL_NOISE + (noise - width_search.SMALL_NOISE) * width_search.STEEP
        assert curve[-1] == pytest.approx(expected, rel=1e-9)
    assert quality.evaluations <= 10 * len(space.groups) + 1


def test_the_knapsack_measures_its_loss_unless_told_to_estimate_it_from_scores(tmp_path, monkeypatch):
    model, x = build("residual")
    calibration = [tuple(torch.rand_like(t) for t in x)]
    for estimate, measured in (("distortion", True), ("share", False)):
        result = fxc.compile(model, x, [{"pass": "auto_prune", "budget": {"macs": 0.5}, "estimate": estimate}],
                             calibration_data=calibration)
        stats = result.history[1].stats
        assert ("distortion_evaluations" in stats) == measured and stats["macs"] <= 0.5
    with pytest.raises(fxc.RecipeError, match="estimate must be one of distortion, share"):
        fxc.compile(model, x, [{"pass": "auto_prune", "estimate": "taylor"}])


def test_the_multiple_choice_knapsack_is_optimal_on_a_small_instance():
    rng = np.random.default_rng(3)
    values = [rng.uniform(0, 10, 4) for _ in range(4)]
    weights = [rng.uniform(0, 5, 4) for _ in range(4)]
    picked = width_search._mckp(values, weights, 9.0, bins=20000)
    best = max((sum(v[j] for v, j in zip(values, c)), c) for c in np.ndindex(4, 4, 4, 4)
               if sum(w[j] for w, j in zip(weights, c)) <= 9.0)
    assert sum(v[j] for v, j in zip(values, picked)) == pytest.approx(best[0], rel=1e-3)


def test_threshold_shares_interpolate_to_where_the_loss_reaches_the_threshold_as_paddleslim():
    table = {"a": {0.1: 0.0, 0.2: 1.0, 0.3: 3.0}, "b": {0.1: 2.0, 0.2: 0.5}, "c": {0.1: 2.0}}
    shares = width_search.threshold_shares(table, 0.5)
    assert shares["a"] == pytest.approx(0.15)  # 0.1 (loss 0) a half of the way to 0.2 (loss 1)
    assert shares["b"] == pytest.approx(0.2)  # a larger share within the threshold counts past a larger loss
    assert shares["c"] == pytest.approx(0.025)  # from share 0 (no loss) towards 0.1 (loss 2)
    assert width_search.threshold_shares(table, 3.0) == {"a": 0.3, "b": 0.2, "c": 0.1}


def test_sensitivity_takes_the_smallest_threshold_that_meets_the_budget():
    gm, cg, space, p, x = _problem("residual", 0.6)
    batches = [tuple(torch.rand_like(t) for t in x) for _ in range(2)]
    p.quality = PlanQuality(gm, cg, space, batches)
    plan = width_search.sensitivity(p)
    assert p.feasible(plan)
    table, threshold = width_search.sensitivities(p), p.info["threshold"]  # the same (cached) evaluations
    assert plan == width_search.by_threshold(p, table, threshold)
    assert threshold > 0 and not p.feasible(width_search.by_threshold(p, table, threshold * (1 - 1e-6)))


def test_plan_quality_scores_the_masked_module_and_leaves_it_unchanged():
    gm, cg, space, p, x = _problem("residual")
    quality = PlanQuality(gm, cg, space, [x])
    assert quality(space.full()) == 200.0
    plan = [lv[len(lv) // 2] for lv in space.levels]
    masked = quality(plan)
    pruned = latency_model.pruned(gm, x, latency_model.targets(space, plan, graph_signature(gm)))
    with torch.no_grad():
        ref, out = gm(*x), pruned(*x)
    assert masked == pytest.approx(sqnr_db(ref.flatten(), out.flatten()), abs=0.05)
    assert quality(space.full()) == 200.0 and quality.evaluations == 2  # cached, restored
    assert counting.totals(gm).params == counting.totals(quality.module).params


def test_plan_quality_can_judge_the_plan_with_re_estimated_bn_statistics():
    gm, cg, space, _, x = _problem("residual")
    batches = [tuple(torch.rand(16, *t.shape[1:]) for t in x) for _ in range(2)]
    quality = PlanQuality(gm, cg, space, batches, recalibrate_bn=True)
    assert quality.norms and quality.recalibration_skipped is None
    plan = [lv[len(lv) // 2] for lv in space.levels]
    # what recalibrate_bn leaves after remove_channels, against the unpruned network recalibrated alike
    pruned = latency_model.pruned(gm, x, latency_model.targets(space, plan, graph_signature(gm)))
    unpruned = copy.deepcopy(gm)
    for module in (pruned, unpruned):
        bn_stats.reestimate(module, bn_stats.tracked_norms(module), batches)
    with torch.no_grad():
        ref = torch.cat([unpruned(*b).flatten() for b in batches])
        out = torch.cat([pruned(*b).flatten() for b in batches])
    assert quality(plan) == pytest.approx(sqnr_db(ref, out), abs=0.05)
    assert quality(plan) != PlanQuality(gm, cg, space, batches)(plan)  # the stale statistics score otherwise
    buffers = [b.clone() for b in quality.module.buffers()]
    quality.cache.clear()
    quality(plan)
    assert all(torch.equal(a, b) for a, b in zip(buffers, quality.module.buffers()))  # restored every time
    assert quality(space.full()) == 200.0  # the noise is the plan's alone
    assert not torch.equal(quality.reference[0], PlanQuality(gm, cg, space, batches).reference[0])


def test_bn_statistics_are_left_alone_where_too_few_samples_would_give_them():
    gm, cg, space, _, x = _problem("linear_bn")
    batches = [tuple(torch.rand(16, *t.shape[1:]) for t in x) for _ in range(3)]
    few = PlanQuality(gm, cg, space, batches[:1], recalibrate_bn=True)
    assert not few.norms and "16 samples, fewer than 32" in few.recalibration_skipped
    assert few(space.full()) == 200.0
    assert PlanQuality(gm, cg, space, batches, recalibrate_bn=True).norms  # two batches of 16 are scored


def test_the_search_re_estimates_bn_statistics_unless_told_not_to():
    model, x = build("residual")
    calibration = [tuple(torch.rand(32, *t.shape[1:]) for t in x)]
    for recalibrate, norms in ((True, True), (False, False)):
        result = fxc.compile(model, x, [{"pass": "auto_prune", "budget": {"macs": 0.5},
                                         "recalibrate_bn": recalibrate}], calibration_data=calibration)
        assert bool(result.history[1].stats["recalibrated_bn"]) == norms
    notes = fxc.compile(model, x, [{"pass": "auto_prune", "budget": {"macs": 0.5}}]).history[1].notes
    assert any("not re-estimated" in n for n in notes)  # the example inputs alone are too few
    with pytest.raises(fxc.RecipeError, match="recalibrate_bn"):
        fxc.compile(model, x, [{"pass": "auto_prune", "recalibrate_bn": "yes"}])


def test_sensitivity_without_data_or_eval_fn_is_refused():
    _, _, _, p, _ = _problem()
    with pytest.raises(fxc.InputError, match="calibration_data"):
        width_search.sensitivity(p)


def _scored_problem(arch="residual", budget=0.5, evaluations=40):
    gm, cg, space, p, x = _problem(arch, budget)
    batches = [tuple(torch.rand_like(t) for t in x) for _ in range(2)]
    p.quality = PlanQuality(gm, cg, space, batches)
    p.evaluations = evaluations
    return gm, cg, space, p, x


def test_netadapt_lowers_its_target_by_decaying_steps_and_keeps_the_best_proposal():
    _, _, space, p, _ = _scored_problem(budget=0.4)
    proposals_seen = []
    quality = p.quality

    def recording(plan):
        proposals_seen.append(list(plan))
        return quality(plan)
    p.quality = recording
    plan = width_search.netadapt(p)
    assert p.feasible(plan)
    trace = p.info["trace"]
    targets = [t["target"] for t in trace]
    assert all(a > b for a, b in zip(targets, targets[1:]))
    steps = [a - b for a, b in zip(targets, targets[1:-1])]  # the last step may be cut at the budget
    assert all(b <= a + 1e-9 for a, b in zip(steps, steps[1:]))
    assert p.info["iterations"] == len(trace) >= 2


def test_netadapt_fine_tunes_each_proposal_when_asked():
    gm, cg, space, p, x = _problem("residual", 0.5)
    batches = [tuple(torch.rand_like(t) for t in x) for _ in range(2)]
    train = [((torch.rand_like(x[0]),), torch.randint(0, 10, (x[0].shape[0],))) for _ in range(2)]
    plan = [lv[len(lv) // 2] for lv in space.levels]
    plain = PlanQuality(gm, cg, space, batches)(plan)
    tuned = PlanQuality(gm, cg, space, batches, train=train, tune_steps=3, lr=0.05)
    assert tuned(plan) != plain
    before = [t.clone() for t in tuned.module.parameters()]
    tuned(plan)  # cached; and the copy's weights are restored after every evaluation
    assert all(torch.equal(a, b) for a, b in zip(before, tuned.module.parameters()))


def test_anneal_is_bounded_metropolis_over_size_ordered_shares():
    _, _, space, p, _ = _scored_problem(budget=0.5, evaluations=12)
    plan = width_search.anneal(p)
    assert p.feasible(plan) and p.info["steps"] <= 12
    assert p.info["best_quality"] == pytest.approx(p.quality(plan), abs=1e-3)
    shares = width_search._by_size(p, np.array([0.1, 0.5, 0.9, 0.3][:len(space.groups)] +
                                               [0.2] * max(0, len(space.groups) - 4)))
    sizes = [g.size for g in space.groups]
    order = np.argsort(sizes, kind="stable")
    assert list(shares[order]) == sorted(shares)  # larger groups get larger shares
    fitted = width_search._fit_budget(p, np.full(len(space.groups), 0.5))
    assert p.feasible(fitted) and space.macs(fitted) > 0.4  # rescaled to use the budget, not far under it


def test_amc_keeps_every_episode_within_the_budget_by_its_wall():
    _, _, space, p, _ = _scored_problem(budget=0.5, evaluations=12)
    values = []
    quality = p.quality

    def recording(plan):
        assert p.feasible(plan)
        values.append(quality(plan))
        return values[-1]
    p.quality = recording
    plan = amc.amc(p)
    assert p.feasible(plan) and len(values) == 12 and p.info["warmup"] == 3
    assert p.info["best_quality"] == pytest.approx(max(values), abs=1e-3)
    state = amc.states(p)
    assert state.shape == (len(space.groups), 8)


def test_auto_compress_drives_the_channels_it_will_remove_towards_zero():
    model, x = build("residual")
    inputs = torch.rand(16, *x[0].shape[1:], generator=torch.Generator().manual_seed(0))
    train = [((inputs[i:i + 8],), torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(i)))
             for i in range(0, 16, 8)]
    result = fxc.compile(model, x, [{"pass": "auto_prune", "budget": {"macs": 0.5}, "strategy": "auto_compress",
                                     "evaluations": 6, "admm_rounds": 3, "admm_rho": 1.0, "epochs": 2,
                                     "lr": 0.05}], calibration_data=[x], train_data=train)
    record = result.history[1]
    assert record.modified and record.contract == "changes"
    norms = record.stats["removed_weight_norm"]
    assert norms[-1] < 0.7 * norms[0]
    with pytest.raises(fxc.RecipeError, match="train_data"):
        fxc.compile(model, x, [{"pass": "auto_prune", "budget": {"macs": 0.5}, "strategy": "auto_compress"}])


def test_the_sensitivity_command_writes_its_table_and_plot(tmp_path, capsys):
    assert main(["sensitivity", "zoo:small_resnet", "--shares", "0.25,0.5", "--json", str(tmp_path / "s.json"),
                 "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "output SQNR (dB)" in out and (tmp_path / "s.png").stat().st_size > 1000
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["shares"] == [0.25, 0.5] and all(set(row) == {"0.25", "0.5"} for row in data["loss"].values())
    assert main(["sensitivity", "zoo:small_resnet", "--shares", "1.5"]) != 0


@pytest.mark.parametrize("arch", ARCHS + ["unet", "dims_1d_3d", "shared_multi_user", "transposed"])
def test_summing_per_group_removals_equals_closing_the_plan_over_the_graph(arch):
    model, x = build(arch)
    cg, space = space_of(fxc.trace(model, x))
    if space._per_group is None:
        pytest.skip(f"{arch}: a unit goes with two groups; plans are closed over the graph")
    rng = np.random.default_rng(1)
    plans = [_random_plan(space, rng) for _ in range(40)] + [[lv[-1] for lv in space.levels], space.full()]
    for plan in plans:
        fast = space._evaluate(plan)
        space._last, per_group = None, space._per_group
        space._per_group = None
        closed = space._evaluate(plan)
        space._last, space._per_group = None, per_group
        assert torch.equal(fast[0], closed[0]) and fast[1] == closed[1], plan
