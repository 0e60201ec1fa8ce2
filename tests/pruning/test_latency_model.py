"""The whole-model latency prediction: layers profiled inside the model are found by their weights and correct the
table where it was measured alone (timings themselves are not asserted, only that they are there and used)."""
from __future__ import annotations

import pytest
from fxcompress.passes.pruning.lib import latency, latency_model, width_search
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.lib.width_space import WidthSpace, candidate_groups
from fxcompress.passes.pruning.select_channels import SCORERS
from zoo import build

import fxcompress as fxc


def _macs_sweep(shape, runtime, widths, threads=1, runs=15, warmup=3):
    """A layer alone costs in proportion to its widths' product (stands in for a measured sweep)."""
    return {(i, o): 1e-6 * i * o for i, o in widths}


def _predictor(tmp_path, monkeypatch, arch="residual"):
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "sweep", _macs_sweep)
    model, x = build(arch)
    gm = fxc.trace(model, x)
    cg = ChannelGraph(gm)
    shapes = latency.layer_shapes(gm)
    space = WidthSpace(cg, SCORERS["l1"](cg, None, {}), shapes, candidate_groups(cg), latency.ALIGN)
    table = latency.build_table(shapes.values(), "ort-int8", points=4)
    return gm, x, space, shapes, latency_model.Predictor(table, space, shapes)


def test_a_layer_observed_inside_the_model_scales_its_table_time_at_the_nearest_widths(tmp_path, monkeypatch):
    _, _, space, shapes, predictor = _predictor(tmp_path, monkeypatch)
    fewest = [lv[-1] for lv in space.levels]
    narrow, wide = space.widths(fewest), space.widths(space.full())
    alone = {name: predictor.curves[name](*w) for name, w in narrow.items()}
    assert predictor.layers(narrow) == pytest.approx(sum(alone.values()))
    layer, other = list(shapes)[:2]
    predictor.observe(fewest, {layer: 3 * alone[layer], other: 100 * alone[other]})
    predictor.observe(space.full(), {layer: predictor.curves[layer](*wide[layer])})  # as alone at full width
    assert predictor.layer(layer, *narrow[layer]) == pytest.approx(3 * alone[layer])
    assert predictor.layer(layer, *wide[layer]) == pytest.approx(predictor.curves[layer](*wide[layer]))
    assert predictor.layer(other, *narrow[other]) == pytest.approx(latency_model.RATIO_BOUNDS[1] * alone[other])
    assert predictor.layer(other, *wide[other]) == pytest.approx(  # its only observation is the nearest
        latency_model.RATIO_BOUNDS[1] * predictor.curves[other](*wide[other]))
    untouched = [n for n in shapes if n not in (layer, other)]
    assert all(predictor.layer(n, *narrow[n]) == pytest.approx(alone[n]) for n in untouched)


def test_an_observed_ratio_gives_way_to_the_layers_typical_ratio_away_from_the_widths_observed(tmp_path,
                                                                                                  monkeypatch):
    _, _, space, shapes, predictor = _predictor(tmp_path, monkeypatch)
    fewest = [lv[-1] for lv in space.levels]
    narrow, wide = space.widths(fewest), space.widths(space.full())
    layer = next(n for n in shapes if wide[n][0] - narrow[n][0] >= 4 and wide[n][1] - narrow[n][1] >= 4)
    curve = predictor.curves[layer]
    predictor.observe(fewest, {layer: 3 * curve(*narrow[layer])})
    predictor.observe(space.full(), {layer: curve(*wide[layer])})

    def ratio(cin: int, cout: int) -> float:
        return predictor.layer(layer, cin, cout) / curve(cin, cout)
    (ni, no), (wi, wo) = narrow[layer], wide[layer]
    assert ratio(ni, no) == pytest.approx(3) and ratio(wi, wo) == pytest.approx(1)
    middle = ratio((ni + wi) // 2, (no + wo) // 2)
    assert 1.05 < middle < 2.9  # neither observation's ratio: the widths between are far from both
    assert middle < ratio(ni + 1, no) < 3  # one channel from the narrow widths: nearly the ratio seen there


def test_the_fastest_plan_follows_what_the_layers_cost_inside_the_model(tmp_path, monkeypatch):
    _, _, space, shapes, predictor = _predictor(tmp_path, monkeypatch)
    fewest = [lv[-1] for lv in space.levels]
    assert width_search.fastest(space, predictor.seconds) == fewest  # alone, the narrowest layers cost least
    narrow = space.widths(fewest)
    # inside the model every narrowest layer runs four times slower than alone (a slower kernel for so few channels)
    predictor.observe(fewest, {n: 4 * predictor.curves[n](*w) for n, w in narrow.items()})
    predictor.observe(space.full(), {n: predictor.curves[n](*w) for n, w in space.widths(space.full()).items()})
    assert width_search.fastest(space, predictor.seconds) != fewest


def test_layers_are_profiled_inside_the_exported_model_by_their_weights_names():
    model, x = build("residual")
    gm = fxc.trace(model, x)
    cg = ChannelGraph(gm)
    shapes = latency.layer_shapes(gm)
    space = WidthSpace(cg, SCORERS["l1"](cg, None, {}), shapes, candidate_groups(cg), latency.ALIGN)
    prefixes = latency_model.weight_prefixes(gm, shapes)
    assert set(prefixes) == set(shapes)
    half = space.nearest(0.5)
    pruned = latency_model.pruned(gm, x, latency_model.targets(space, half))
    for module in (gm, pruned):
        onnx_bytes = latency_model.prepared(module, "ort-int8", x)
        nodes = latency_model.onnx_layers(onnx_bytes, prefixes)
        assert sorted(nodes.values()) == sorted(shapes)  # every layer, once
        seconds = latency_model.profile_layers(onnx_bytes, x, nodes, runs=5)
        assert set(seconds) == set(shapes) and all(s > 0 for s in seconds.values())


def test_a_fit_that_makes_the_layers_implausibly_dear_falls_back_to_a_simpler_one(tmp_path, monkeypatch):
    # plans whose measured times differ little, noise read as a steep slope: a = 3.3 with a negative constant
    _, _, space, _, predictor = _predictor(tmp_path, monkeypatch)
    plans = [space.nearest(s) for s in (0.25, 0.5, 0.7)] + [space.full()]
    layers = {tuple(p): predictor.terms(p)[0] for p in plans}
    points = [(p, 3.3 * layers[tuple(p)] - 0.5 * max(layers.values())) for p in plans]
    predictor.calibrate(points)
    assert latency_model.SCALE_BOUNDS[0] <= predictor.scale <= latency_model.SCALE_BOUNDS[1]
    pruned = [(p, s) for p, s in points if any(p)]
    errors = [abs(predictor.seconds(p) - s) for p, s in pruned]
    assert max(errors) < max(s for _, s in pruned) - min(s for _, s in pruned)  # still within the points' spread
