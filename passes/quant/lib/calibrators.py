"""Calibrators: statistics collected over calibration batches, and the clipping range each method picks.

``MinMax`` keeps the running minimum and maximum (per tensor or per channel).  ``Histogram`` keeps a histogram
of |x| with ``bins`` bins over [0, range); when a batch exceeds the range, the range doubles (as often as
needed) and every 2^k old bins merge into one new bin, so re-binning is exact.  The threshold searches run on
``resampled(n)``: n bins over the data's own range [0, max|x|].  From the histogram:

- ``percentile(p)``: the p-th percentile of |x|,
- ``mse(levels)``: the threshold minimising the expected squared quantization error (clipping + rounding),
- ``kl(levels)``: TensorRT's entropy calibration: for each candidate threshold i (in bins), the reference
  distribution P is the first i bins with the tail folded into the last one, Q is those bins (without the
  tail) merged into ``levels`` levels and spread back over P's non-zero bins; the threshold with the smallest
  KL(P || Q) wins (prefix sums make each candidate cost O(levels)),
- ``kl_tolerance(levels, tolerance)``: the largest threshold whose KL is within ``tolerance`` times the
  smallest (``tolerance=1.0`` is plain KL).

Infinities and NaNs are left out of every range and counted (``nonfinite``): a -inf padding before a max pool
(timm's "same" padding) saturates at the bottom of the range, where the pool never picks it.

Every threshold search is vectorised over all candidates at once.  ``levels`` is 128 for signed int8
(|x| maps to 0..127) and 256 for unsigned (x >= 0 maps to 0..255).
"""
from __future__ import annotations

import math

import torch

HIST_CHUNK = 1 << 16  # values binned per step of a histogram update
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def dense_flat(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` as one dimension, in memory order: a view (no copy) for any dense layout, such as
    channels-last (order does not matter to a histogram)."""
    if x.is_contiguous() or x.dim() < 2:
        return x.reshape(-1)
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return x.permute(order).reshape(-1)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class MinMax:
    """Running min and max, over the whole tensor or per channel along ``axis``."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.nonfinite = 0  # values left out of the range (see the module docstring)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.axis is None:
            lo, hi = torch.aminmax(dense_flat(x))  # as one dimension: reducing a channels-last 4-d tensor is slow
        else:
            flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
            lo, hi = torch.aminmax(flat, dim=1)
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            finite = torch.isfinite(x)
            self.nonfinite += int(x.numel() - finite.sum())
            self.update(torch.where(finite, x, torch.zeros(())))  # zero is in every range (qparams)
            return
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)


class Histogram:
    """Histogram of |x| over [0, range) with exact range doubling."""

    def __init__(self, bins: int = 2048):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.bins = bins
        self.range = 0.0
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.min = math.inf
        self.max = -math.inf
        self.nonfinite = 0

    @property
    def width(self) -> float:
        return self.range / self.bins

    def update(self, x: torch.Tensor) -> None:
        x = dense_flat(x.detach().float())
        if not x.numel():
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = x[torch.isfinite(x)]
            self.nonfinite += x.numel() - finite.numel()
            self.update(finite)
            return
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        top = max(-lo, hi)
        if self.range == 0.0:
            self.range = top if top > 0 else 1.0
        while top >= self.range and top > 0:
            self._double()
        # bin = floor(|x| * bins / range); doubling the range halves the factor exactly, so bins merge exactly.
        # Chunks of HIST_CHUNK values keep the temporaries in cache (int32 indices, then bincount).
        # A value within rounding of the range can land one past the last bin: bincount grows, and the overflow
        # folds back into the last bin.  Non-negative data (after a ReLU) skips the abs.
        # A range so small that bins / range overflows float32 (outputs of 1e-40 in a model whose activations
        # vanish) divides by the range first: the same bins, and no infinite index.
        factor = self.bins / self.range
        overflow = factor > FLOAT32_MAX
        counts = torch.zeros(self.bins + 1, dtype=torch.int64)
        magnitude = torch.abs if lo < 0 else _identity
        for chunk in x.split(HIST_CHUNK):
            scaled = magnitude(chunk).div(self.range).mul(self.bins) if overflow else magnitude(chunk).mul(factor)
            counts += torch.bincount(scaled.to(torch.int32), minlength=self.bins + 1)
        counts[-2] += counts[-1]
        self.counts += counts[:-1].double()

    def _double(self) -> None:
        """Range x2: pairs of bins merge exactly into one."""
        self.counts = torch.cat([self.counts.view(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.float64)])
        self.range *= 2

    def resampled(self, target: int) -> Histogram:
        """This histogram as exactly ``target`` bins over [0, max|x|], as TensorRT's 2048 bins over [0, amax].

        The stored range can be up to twice the data's (it doubles), so the data may cover as little as half the
        stored bins; the threshold searches should see the data's own range at the stated resolution (the KL of a
        candidate depends on how many bins it merges).  The cumulative counts, linear within each stored bin, are
        read at the new edges: a stored bin straddling two new ones splits its count in proportion.  Store several
        times more bins than the target (``QuantSpec`` stores 4x) so that each stored bin is a small part of a new
        one.  The total count is exact.
        """
        top = max(abs(self.min), abs(self.max))
        if not math.isfinite(top) or top <= 0 or self.width == 0:
            return self
        stored = torch.arange(self.bins + 1, dtype=torch.float64) * self.width
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.counts, 0)])
        edges = torch.arange(target + 1, dtype=torch.float64) * (top / target)
        j = torch.searchsorted(stored, edges, right=True).clamp(1, self.bins) - 1  # stored bin holding each edge
        frac = ((edges - stored[j]) / self.width).clamp(0, 1)
        at = cdf[j] + frac * self.counts[j]
        at[-1] = cdf[-1]  # everything up to max|x| (and float dust beyond it) is in
        out = Histogram.__new__(Histogram)
        out.bins, out.range, out.counts = target, top, torch.diff(at).clamp(min=0)
        out.min, out.max, out.nonfinite = self.min, self.max, self.nonfinite
        return out

    def edges(self) -> torch.Tensor:
        return torch.arange(1, self.bins + 1, dtype=torch.float64) * self.width

    def percentile(self, p: float) -> float:
        total = float(self.counts.sum())
        if total == 0:
            return 0.0
        cum = torch.cumsum(self.counts, 0)
        i = int(torch.searchsorted(cum, torch.tensor(p / 100.0 * total, dtype=torch.float64)))
        return float(self.edges()[min(i, self.bins - 1)])

    def mse_errors(self, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate thresholds: the bin edges, E[(x - q(x))^2] x count for each).

        With threshold t at the edge of bin k: every sample in bins [0, k] costs the rounding error step^2 / 12
        (step = t / (levels - 1)); a clipped sample at bin centre c costs (c - t)^2.  Suffix sums of count, count x c
        and count x c^2 over the clipped bins give every candidate at once: O(bins).
        """
        centers = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width
        t = self.edges()
        inside = torch.cumsum(self.counts, 0)

        def clipped(values: torch.Tensor) -> torch.Tensor:  # sum over bins j > k, for each k
            return torch.cat([torch.flip(torch.cumsum(torch.flip(values, [0]), 0), [0])[1:],
                              torch.zeros(1, dtype=values.dtype)])

        s0, s1, s2 = clipped(self.counts), clipped(self.counts * centers), clipped(self.counts * centers ** 2)
        step = t / (levels - 1 if levels > 1 else 1)
        return t, inside * step ** 2 / 12 + (s2 - 2 * t * s1 + t ** 2 * s0).clamp(min=0)

    def mse(self, levels: int) -> float:
        """Threshold t minimising E[(x - q(x))^2]: rounding error plus the squared excess of clipped samples
        (bin centres as values)."""
        t, errors = self.mse_errors(levels)
        return float(t[int(torch.argmin(errors))])

    def kl_divergences(self, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate thresholds in bins, KL(P || Q) for each), candidates from ``levels`` to ``bins``.

        As in TensorRT's calibrator, the first bin's count is replaced by the second's: after a ReLU half of the
        values can be exact zeros, and that spike, spread over the first quantization level's bins, would dominate
        every divergence and pull the threshold down to the smallest candidate.
        """
        h = self.counts.clone()
        h[0] = h[1]
        cands = torch.arange(levels, self.bins + 1)
        return cands, _kl_all(h, cands, levels)

    def kl(self, levels: int, tolerance: float = 1.0) -> float:
        """TensorRT entropy threshold; with tolerance > 1, the largest threshold whose KL is within
        ``tolerance`` x the minimum."""
        if float(self.counts.sum()) == 0:
            return 0.0
        cands, kl = self.kl_divergences(levels)
        best = float(kl.min())
        ok = kl <= tolerance * best + 1e-12
        i = int(cands[ok].max()) if tolerance > 1.0 else int(cands[int(torch.argmin(kl))])
        return (i + 0.5) * self.width if i < self.bins else self.range


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * log(y), 0 where x is 0."""
    return torch.where(x > 0, x * torch.log(y.clamp(min=1e-300)), torch.zeros((), dtype=x.dtype))


def _kl_all(h: torch.Tensor, cands: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) for each candidate i in ``cands``, in closed form over the ``levels`` groups.

    P: bins [0, i) with the tail (bins >= i) folded into bin i-1.  Q: bins [0, i) without the tail merged into
    ``levels`` groups of m = i // levels bins (the last takes the remainder), each group's mass spread evenly over
    the bins where P is non-zero.  Because Q is constant on a group's non-zero bins,

        KL = sum_j P_j log P_j - sum_g P(g) log(mass_g / nonzero_g) + log C_i,

    with C_i the mass of bins [0, i) (the P(g) sum to 1).  Prefix sums give every term.  The first
    ``levels - 1`` groups depend on i only through m, so their sum is computed once per m (i // levels takes
    bins / levels values) and only the last group per candidate: the whole search is O(bins), not
    O(candidates x levels).  A candidate where P has mass and Q none is infinitely bad.
    """
    dtype = h.dtype
    zero = torch.zeros(1, dtype=dtype)
    t = h.sum()
    cum = torch.cat([zero, torch.cumsum(h, 0)])
    cum_nz = torch.cat([zero, torch.cumsum((h > 0).to(dtype), 0)])
    cum_hlogh = torch.cat([zero, torch.cumsum(_xlogy(h, h), 0)])
    i = cands
    tail = cum[-1] - cum[i]
    last = h[i - 1] + tail  # P's last bin, unnormalised
    plogp = (cum_hlogh[i - 1] + _xlogy(last, last)) / t - torch.log(t)
    m = torch.div(i, levels, rounding_mode="floor")
    widths = torch.arange(1, int(m.max()) + 1)[:, None]  # every group width m that occurs
    lo = torch.arange(levels - 1)[None, :] * widths
    mass = cum[lo + widths] - cum[lo]
    body = (_xlogy(mass, mass) - _xlogy(mass, cum_nz[lo + widths] - cum_nz[lo])).sum(1)[m - 1]
    start = (levels - 1) * m  # the last group: [start, i), with P's folded tail
    mass_last = cum[i] - cum[start]
    nz_last = cum_nz[i] - cum_nz[start] + ((h[i - 1] == 0) & (tail > 0)).to(dtype)
    p_last = mass_last + tail
    cross = (body + _xlogy(p_last, mass_last) - _xlogy(p_last, nz_last)) / t - torch.log(cum[i].clamp(min=1e-300))
    kl = plogp - cross
    impossible = (p_last > 0) & (mass_last == 0)
    return torch.where(impossible, torch.full_like(kl, math.inf), kl)
