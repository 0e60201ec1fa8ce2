"""Width searches under a measured latency budget: the floor among its candidates, the confirmation loop that
measures, learns and searches again, and its fallbacks (latency tables and measurements stood in by fakes, except
where a real ORT run is the point)."""
from __future__ import annotations

import numpy as np
import pytest
from fxcompress.passes.pruning import search_widths
from fxcompress.passes.pruning.lib import latency, latency_model, width_search
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.select_channels import SCORERS
from test_search_widths import space_of
from zoo import build

import fxcompress as fxc


def _blocked_ms(space, removed):
    """Milliseconds of a plan where channels cost in blocks of 8 and a group left with fewer than 8 channels takes
    a slower kernel (as ONNX Runtime's U8S8 convolutions with 4 output channels against 16)."""
    kept = [g.size - k for g, k in zip(space.groups, removed)]
    return 1e-3 * sum(-(-n // 8) + (2 if n < 8 else 0) for n in kept)


def test_the_floor_is_the_fastest_plan_on_the_table_not_the_fewest_channels():
    model, x = build("residual")  # groups of 16, 8 and 8 channels
    _, space = space_of(fxc.trace(model, x), round_to=4)
    loss = width_search.share_loss(SCORERS["l1"](ChannelGraph(fxc.trace(model, x)), None, {}), space)

    def cost(removed):
        return _blocked_ms(space, removed)
    fewest = [lv[-1] for lv in space.levels]
    floor = width_search.fastest(space, cost)
    assert [g.size - k for g, k in zip(space.groups, floor)] == [8, 8, 8]  # 8 of 16, and 8 of 8 (not 4)
    assert cost(floor) == pytest.approx(3e-3) and cost(fewest) == pytest.approx(9e-3)
    p = width_search.Problem(space, cost, 3.5e-3, loss, floor=floor)
    assert width_search.knapsack(p) == floor and "fallback" not in p.info  # between the floor and the fewest
    below = width_search.Problem(space, cost, 2.5e-3, loss, floor=floor)
    assert width_search.knapsack(below) == floor and "fallback" in below.info
    plan = width_search.uniform(below)  # no uniform share reaches 3.5 ms: the cheapest of them
    assert "fallback" in below.info and cost(plan) == min(cost(below.nearest(s)) for s in np.arange(0, 1.001, 0.005))


def test_the_floor_candidates_include_the_cheapest_uniform_plan_where_the_descent_is_stuck():
    model, x = build("residual")  # groups of 16, 8 and 8 channels
    _, space = space_of(fxc.trace(model, x), round_to=1)

    def cost(removed):  # any group under 4 channels takes a slow kernel for the whole model: no single group's move
        kept = [g.size - k for g, k in zip(space.groups, removed)]  # out of the fewest channels pays
        return 1e-3 * (sum(kept) / 8 + (10 if min(kept) < 4 else 0))
    plans = width_search.floor_plans(space, cost)
    assert "fastest" not in plans  # the descent from the fewest channels stays there
    kept = [g.size - k for g, k in zip(space.groups, plans["uniform"])]
    assert all(n % (space.round_to * width_search.COARSER[-1]) == 0 for n in kept)
    assert cost(plans["uniform"]) < cost(plans["fewest"]) - 5e-3


def _fake_latency(monkeypatch, predictor, measure_plans):
    """No layer table: ``predictor`` predicts and ``measure_plans`` measures."""
    monkeypatch.setattr(latency, "build_table", lambda *args, **kwargs: None)
    monkeypatch.setattr(latency_model, "Predictor", predictor)
    monkeypatch.setattr(latency_model, "measure_plans", measure_plans)


class _BlockedPredictor:
    """A latency model whose cost is ``_blocked_ms`` (stands in for the measured table)."""

    def __init__(self, table, space, shapes):
        self.space, self.scale, self.const, self.per_volume = space, 1.0, 0.0, 0.0

    def seconds(self, removed):
        return _blocked_ms(self.space, removed)

    def calibrate(self, points):
        pass


def test_auto_prune_meets_a_budget_below_the_fewest_channels_when_a_wider_plan_is_faster(tmp_path, monkeypatch):
    measured = []

    def measure_plans(gm, inputs, space, plans, *args, **kwargs):
        measured.append(dict(plans))
        return {k: _blocked_ms(space, v) for k, v in plans.items()}
    _fake_latency(monkeypatch, _BlockedPredictor, measure_plans)
    model, x = build("residual")
    recipe = [{"pass": "auto_prune", "budget": {"latency_ms": 3.5}, "estimate": "share", "round_to": 4}]
    run = fxc.compile(model, x, recipe).history[1]
    assert {"fewest", "fastest"} <= set(measured[0])
    assert run.stats["fastest_ms"] == pytest.approx(3.0) and run.stats["measured_ms"] <= 3.5
    assert run.stats["fastest_kept"] == run.stats["kept"] == {"down.0": 8, "stem.0": 8, "a.0": 8}
    recipe[0]["budget"] = {"latency_ms": 2.5}
    with pytest.raises(fxc.RecipeError, match="3.000 ms with the fastest width plan on the latency table"):
        fxc.compile(model, x, recipe)


class _LearningPredictor(_BlockedPredictor):
    """Calls every plan 40 % dearer than it measures until a measured plan was added to its calibration."""

    def __init__(self, table, space, shapes):
        super().__init__(table, space, shapes)
        self.fits = 0

    def seconds(self, removed):
        return _blocked_ms(self.space, removed) * (1.4 if self.fits < 2 else 1.0)

    def calibrate(self, points):
        self.fits += 1


def test_a_plan_met_at_the_first_target_is_searched_again_on_what_its_measurement_taught(tmp_path, monkeypatch):
    def measure_plans(gm, inputs, space, plans, *args, **kwargs):
        return {k: _blocked_ms(space, v) for k, v in plans.items()}
    _fake_latency(monkeypatch, _LearningPredictor, measure_plans)
    model, x = build("residual")
    recipe = [{"pass": "auto_prune", "budget": {"latency_ms": 5.2}, "estimate": "share", "round_to": 4,
               "confirm": 4}]
    run = fxc.compile(model, x, recipe).history[1]
    attempts = [n for n in run.notes if n.startswith("attempt")]
    assert len(attempts) == run.stats["confirmations"] >= 2 and all(" <= " in a for a in attempts)
    macs = [float(a.split("MACs ")[1].split(",")[0]) for a in attempts]
    assert macs[1] > macs[0]  # the prediction overestimated the first plan: the second keeps more
    assert run.stats["macs"] == pytest.approx(max(macs), abs=1e-3)


def test_when_no_searched_plan_measures_within_the_budget_the_floor_measured_within_it_is_taken(tmp_path,
                                                                                                   monkeypatch):
    def measure_plans(gm, inputs, space, plans, *args, **kwargs):  # every confirmed plan runs 30 % over its prediction
        return {k: _blocked_ms(space, v) * (1.3 if k == "plan" else 1) for k, v in plans.items()}
    _fake_latency(monkeypatch, _BlockedPredictor, measure_plans)
    model, x = build("residual")
    recipe = [{"pass": "auto_prune", "budget": {"latency_ms": 3.5}, "estimate": "share", "round_to": 4,
               "confirm": 3}]
    run = fxc.compile(model, x, recipe).history[1]
    assert run.stats["kept"] == run.stats["fastest_kept"] and run.stats["measured_ms"] == pytest.approx(3.0)
    assert "floor" in run.stats["fallback"] and any("the floor plan" in n for n in run.notes)


def test_a_latency_budget_below_the_floor_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path))
    model, x = build("residual")
    with pytest.raises(fxc.RecipeError, match="below the fastest"):
        fxc.compile(model, x, [{"pass": "auto_prune", "budget": {"latency": 0.01}, "points": 4}])


@pytest.mark.slow  # 30 s; the README's auto_prune example runs the same measured path in the default suite
def test_auto_prune_meets_a_measured_latency_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path))
    model, x = fxc.golden.load("vgg-small-digits", batch_size=8)
    result = fxc.compile(model, x, [{"pass": "auto_prune", "budget": {"latency": 0.6}, "points": 8}])
    stats = result.history[1].stats
    assert stats["measured_ms"] <= stats["budget_ms"] * 1.05
    assert stats["budget_ms"] == pytest.approx(0.6 * stats["full_ms"], rel=1e-3)
    assert result.after.macs < result.before.macs


class _MacsPredictor(_BlockedPredictor):
    """Time follows the MACs, as ``_macs_ms`` measures it."""

    def seconds(self, removed):
        return _macs_ms(self.space, removed)


def _macs_ms(space, removed):
    return 1e-3 * (0.2 + 0.8 * space.macs(removed))


def test_a_search_whose_plans_all_missed_measures_up_to_twice_confirm_plans_before_taking_the_floor(tmp_path,
                                                                                                     monkeypatch):
    confirmations = []

    def measure_plans(gm, inputs, space, plans, *args, **kwargs):  # the first two confirmed plans run 30 % over
        if "plan" in plans:
            confirmations.append(plans["plan"])
        return {k: _macs_ms(space, v) * (1.3 if k == "plan" and len(confirmations) <= 2 else 1)
                for k, v in plans.items()}
    _fake_latency(monkeypatch, _MacsPredictor, measure_plans)
    model, x = build("residual")
    run = fxc.compile(model, x, [{"pass": "auto_prune", "budget": {"latency": 0.6}, "points": 4, "round_to": 1,
                                  "estimate": "share", "confirm": 2}]).history[1]
    assert run.stats["confirmations"] == len(confirmations) >= 3 and "fallback" not in run.stats
    assert run.stats["measured_ms"] <= run.stats["budget_ms"] * (1 - search_widths.CONFIRM_MARGIN)
    assert run.stats["kept"] != run.stats["fastest_kept"]


def test_a_missed_budget_is_searched_again_and_the_best_plan_measured_within_it_wins(tmp_path, monkeypatch):
    confirmations = []

    def measure_plans(gm, inputs, space, plans, *args, **kwargs):  # as predicted, but the first plan misses
        if "plan" in plans:
            confirmations.append(plans["plan"])
        return {k: _macs_ms(space, v) * (1.3 if k == "plan" and len(confirmations) == 1 else 1)
                for k, v in plans.items()}
    _fake_latency(monkeypatch, _MacsPredictor, measure_plans)
    model, x = build("residual")
    result = fxc.compile(model, x, [{"pass": "auto_prune", "budget": {"latency": 0.6}, "points": 4,
                                     "estimate": "share", "confirm": 4}])
    run = result.history[1]
    attempts = [n for n in run.notes if n.startswith("attempt")]
    assert len(attempts) == len(confirmations) == run.stats["confirmations"] >= 2
    assert len({tuple(c) for c in confirmations}) == len(confirmations)  # no plan measured twice
    assert " > " in attempts[0] and " <= " in attempts[1]  # missed, then met at a lowered target
    met = [float(n.split("estimated loss ")[1].rstrip(")")) for n in attempts if " <= " in n]
    assert run.stats["estimated_loss"] == pytest.approx(min(met), rel=1e-5)
    assert run.stats["measured_ms"] <= run.stats["budget_ms"] * (1 - search_widths.CONFIRM_MARGIN)
