"""Calibrators: exact histogram growth, and vectorised threshold searches equal to straightforward loops."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fxcompress.passes.quant.lib.calibrators import Histogram, MinMax
from hypothesis import given, settings
from hypothesis import strategies as st


def _kl_loop(hist: np.ndarray, levels: int) -> list[float]:
    """TensorRT entropy calibration written plainly, one candidate and one bin at a time."""
    hist = hist.copy()
    hist[0] = hist[1]  # the zero spike, as TensorRT treats it
    out = []
    for i in range(levels, len(hist) + 1):
        sliced = hist[:i].astype(np.float64)
        p = sliced.copy()
        p[i - 1] += hist[i:].sum()
        merged = i // levels
        q = np.zeros(i)
        for g in range(levels):
            start = g * merged
            stop = i if g == levels - 1 else start + merged
            nz = p[start:stop] > 0
            if nz.sum():
                q[start:stop][nz] = sliced[start:stop].sum() / nz.sum()
        p /= p.sum()
        q /= q.sum()
        mask = p > 0
        if (q[mask] == 0).any():
            out.append(math.inf)
            continue
        out.append(float((p[mask] * np.log(p[mask] / q[mask])).sum()))
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), bins=st.sampled_from([256, 512]), levels=st.sampled_from([16, 128]),
       heavy=st.booleans())
def test_vectorised_kl_equals_loop(seed, bins, levels, heavy):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5000, generator=g)
    if heavy:
        x = x * torch.rand(5000, generator=g).pow(4) * 10  # a long tail
    h = Histogram(bins)
    h.update(x)
    _, kl = h.kl_divergences(levels)
    ref = _kl_loop(h.counts.numpy(), levels)
    assert np.allclose(kl.numpy(), ref, rtol=1e-9, atol=1e-12)


def _mse_loop(hist: Histogram, levels: int) -> list[float]:
    """The expected squared error of every threshold, summed bin by bin."""
    w = hist.width
    out = []
    for k in range(hist.bins):
        t = (k + 1) * w
        step = t / (levels - 1)
        err = 0.0
        for j, count in enumerate(hist.counts.tolist()):
            c = (j + 0.5) * w
            err += count * (step ** 2 / 12 if c <= t else (c - t) ** 2)
        out.append(err)
    return out


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), levels=st.sampled_from([16, 128, 256]), heavy=st.booleans())
def test_vectorised_mse_equals_loop(seed, levels, heavy):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, generator=g)
    if heavy:
        x = x * torch.rand(3000, generator=g).pow(4) * 10
    h = Histogram(128)
    h.update(x)
    _, errors = h.mse_errors(levels)
    ref = np.array(_mse_loop(h, levels))
    assert np.allclose(errors.numpy(), ref, rtol=1e-9, atol=1e-9 * ref.max())
    assert h.mse(levels) == pytest.approx((int(np.argmin(ref)) + 1) * h.width)


def test_range_growth_is_exact():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(1000, generator=g) * s for s in (0.1, 1.0, 7.0)]
    grown = Histogram(512)
    for x in parts:
        grown.update(x)
    direct = Histogram(512)
    direct.range = grown.range
    direct.update(torch.cat(parts))
    assert torch.equal(grown.counts, direct.counts)
    assert grown.counts.sum() == 3000


def test_kl_tolerance_takes_a_larger_threshold_and_one_is_plain_kl():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g) * torch.rand(20000, generator=g).pow(3) * 5
    h = Histogram(2048)
    h.update(x)
    plain = h.kl(128)
    assert h.kl(128, tolerance=1.0) == plain
    loose = h.kl(128, tolerance=1.3)
    assert plain <= loose <= h.range
    cands, kl = h.kl_divergences(128)
    i = round(loose / h.width - 0.5)
    assert kl[cands == i].item() <= 1.3 * kl.min().item() + 1e-12


def test_kl_is_not_pulled_down_by_the_zeros_of_a_relu():
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(100_000, generator=g))  # half exact zeros
    h = Histogram(2048)
    h.update(x)
    t = h.kl(256)
    assert 0.6 * float(x.max()) < t <= float(x.max()) + h.width  # a Gaussian tail clips little at 256 levels


def test_percentile_mse_minmax():
    x = torch.linspace(-4, 4, 8001)
    h = Histogram(2048)
    h.update(x)
    assert h.percentile(100) == pytest.approx(4.0, rel=1e-3)
    assert h.percentile(50) == pytest.approx(2.0, rel=1e-2)
    t = h.mse(256)
    assert 0 < t <= 4.0 + h.width
    m = MinMax(axis=0)
    m.update(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    assert m.min.tolist() == [-2.0, 0.5] and m.max.tolist() == [1.0, 3.0]
    assert not math.isnan(h.kl(128))


def test_minmax_of_a_channels_last_tensor_and_per_channel():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 4, 6, generator=g)
    for axis in (None, 1):
        plain, last = MinMax(axis), MinMax(axis)
        plain.update(x)
        last.update(x.contiguous(memory_format=torch.channels_last))
        assert torch.equal(plain.min, last.min) and torch.equal(plain.max, last.max)
    assert float(plain.min[2]) == float(x[:, 2].min()) and float(plain.max[4]) == float(x[:, 4].max())
    whole = MinMax()
    whole.update(x)
    whole.update(x * 3)
    assert float(whole.min) == float((x * 3).min()) and float(whole.max) == float((x * 3).max())


def _fake_quant(x, scale, zero, spec):
    q = torch.clamp(torch.round(x / scale) + zero, spec.qmin, spec.qmax)
    return (q - zero) * scale


def test_qparams_per_channel_unsigned_affine_and_histogram_methods():
    from fxcompress.passes.quant.lib.quant_spec import QuantSpec, qparams

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.01]).view(4, 1, 1, 1)
    spec = QuantSpec(axis=0)
    cal = spec.calibrator()
    cal.update(w)
    scale, zero = qparams(spec, cal)
    assert scale.shape == (4,) and not zero.any()
    assert torch.allclose(scale, w.abs().amax((1, 2, 3)) / 127)
    err = (_fake_quant(w, scale.view(4, 1, 1, 1), 0, spec) - w).abs()
    assert (err <= scale.view(4, 1, 1, 1) / 2 + 1e-7).all()

    relu = torch.relu(torch.randn(1000, generator=g))
    spec = QuantSpec(signed=False)
    cal = spec.calibrator()
    cal.update(relu)
    scale, zero = qparams(spec, cal)
    assert zero == 0 and scale == pytest.approx(relu.max().item() / 255)

    x = torch.randn(1000, generator=g) + 2.0
    spec = QuantSpec(signed=False, symmetric=False)
    cal = spec.calibrator()
    cal.update(x)
    scale, zero = qparams(spec, cal)
    assert 0 < zero < 255
    assert (_fake_quant(x, scale, zero, spec) - x).abs().max() <= scale / 2 + 1e-6

    for method in ("percentile", "mse", "kl", "kl_tolerance"):
        spec = QuantSpec(method=method)
        cal = spec.calibrator()
        cal.update(torch.randn(20000, generator=g) * torch.rand(20000, generator=g).pow(3) * 5)
        scale, zero = qparams(spec, cal)
        assert 0 < scale.item() * 127 <= max(abs(cal.min), abs(cal.max)) + 1e-6, method
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="saw no data"):
        qparams(QuantSpec(), QuantSpec().calibrator())


def test_observer_passes_tensors_through_and_calibrates():
    from fxcompress.passes.quant.lib.quant_spec import QuantSpec, qparams

    from fxcompress.modules import Observer

    obs = Observer(QuantSpec(signed=False, method="kl"))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.relu(torch.randn(2, 8, 4, 4, generator=g))
        assert obs(x) is x
    assert obs.batches == 3
    scale, zero = qparams(obs.spec, obs.calibrator)
    assert zero == 0 and 0 < scale.item() * 255 <= obs.calibrator.max + 1e-6
    obs.enabled = False
    obs(torch.full((3,), 1e6))
    assert obs.batches == 3 and obs.calibrator.max < 1e6
    assert "u8" in repr(obs) and "kl" in repr(obs)


def test_resampled_has_exactly_the_target_bins_over_the_data_range():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g) * 2.0
    h = Histogram(8192)
    h.update(x[:1000] * 0.1)  # a small first batch: the range doubles several times afterwards
    h.update(x)
    top = float(x.abs().max())
    r = h.resampled(2048)
    assert r.bins == 2048 and r.counts.numel() == 2048
    assert r.range == pytest.approx(top)
    assert float(r.counts.sum()) == pytest.approx(float(h.counts.sum()), rel=1e-12)
    direct = torch.histc(torch.cat([x[:1000] * 0.1, x]).abs().double(), bins=2048, min=0, max=top)
    # each stored bin is at most half a new one, so a new bin's count is off by at most its neighbours' edges
    assert float((r.counts - direct).abs().sum()) <= 0.02 * float(direct.sum())


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "kl"])
def test_observer_skips_empty_tensors(method):
    """A detector's mask head gets no RoIs on some images: an empty tensor has no range and counts as no batch."""
    from fxcompress.passes.quant.lib.quant_spec import QuantSpec, qparams

    from fxcompress.modules import Observer

    obs = Observer(QuantSpec(signed=False, method=method))
    empty = torch.zeros(0, 8, 4, 4)
    assert obs(empty) is empty and obs.batches == 0
    with pytest.raises(ValueError, match="saw no data"):
        qparams(obs.spec, obs.calibrator)
    obs(torch.rand(2, 8, 4, 4))
    obs(empty)
    assert obs.batches == 1 and 0 < obs.calibrator.max <= 1


@pytest.mark.parametrize("method", ["minmax", "minmax_channel", "histogram"])
def test_infinities_and_nans_are_left_out_of_the_range_and_counted(method):
    x = torch.tensor([[-2.0, 1.0, -math.inf], [0.5, math.inf, math.nan]])
    cal = {"minmax": MinMax, "minmax_channel": lambda: MinMax(axis=0), "histogram": Histogram}[method]()
    cal.update(x)
    cal.update(torch.tensor([[0.25, 3.0, -1.0], [0.0, 0.0, 0.0]]))
    assert cal.nonfinite == 3
    lo, hi = (float(cal.min.min()), float(cal.max.max())) if method != "histogram" else (cal.min, cal.max)
    assert (lo, hi) == (-2.0, 3.0)
    if method == "histogram":
        assert float(cal.counts.sum()) == 9 and cal.range >= 3.0  # the finite values only


def test_a_histogram_of_vanishing_values_has_the_bins_of_the_same_values_scaled_up():
    """Values of 1e-40 (activations of a model whose BatchNorm weights were drawn near 0) made bins / range
    overflow float32: the indices were garbage and bincount failed."""
    torch.manual_seed(0)
    x = torch.randn(10_000)
    tiny, normal = Histogram(2048), Histogram(2048)
    tiny.update(x * 2.0 ** -121)
    normal.update(x)
    assert tiny.range == normal.range * 2.0 ** -121 and tiny.counts.sum() == x.numel()
    assert torch.equal(tiny.counts, normal.counts)
