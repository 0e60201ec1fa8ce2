"""Calibrators: statistics collected over calibration batches, and the clipping range each method picks.

``MinMax`` keeps the running minimum and maximum (per tensor or per channel).  ``Histogram`` keeps a histogram
of |x| with ``bins`` bins over [0, range); when a batch exceeds the range, the range doubles (as often as
needed) and every 2^k old bins merge into one new bin, so re-binning is exact.  From the histogram:

- ``percentile(p)``: the p-th percentile of |x|,
- ``mse(levels)``: the threshold minimising the expected squared quantization error (clipping + rounding),
- ``kl(levels)``: TensorRT's entropy calibration: for each candidate threshold i (in bins), the reference
  distribution P is the first i bins with the tail folded into the last one, Q is those bins (without the
  tail) merged into ``levels`` levels and spread back over P's non-zero bins; the threshold with the smallest
  KL(P || Q) wins (prefix sums make each candidate cost O(levels)),
- ``kl_tolerance(levels, tolerance)``: the largest threshold whose KL is within ``tolerance`` times the
  smallest (``tolerance=1.0`` is plain KL).

Every threshold search is vectorised over all candidates at once.  ``levels`` is 128 for signed int8
(|x| maps to 0..127) and 256 for unsigned (x >= 0 maps to 0..255).
"""
from __future__ import annotations

import math

import torch

CANDIDATE_CHUNK = 256  # candidates evaluated per vectorised block (bounds memory to chunk x bins floats)
HIST_CHUNK = 1 << 16  # values binned per step of a histogram update


def dense_flat(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` as one dimension, in memory order: a view (no copy) for any dense layout, such as
    channels-last (order does not matter to a histogram)."""
    if x.is_contiguous() or x.dim() < 2:
        return x.reshape(-1)
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return x.permute(order).reshape(-1)


class MinMax:
    """Running min and max, over the whole tensor or per channel along ``axis``."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.axis is None:
            lo, hi = x.min(), x.max()
        else:
            flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
            lo, hi = flat.min(1).values, flat.max(1).values
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

    @property
    def width(self) -> float:
        return self.range / self.bins

    def update(self, x: torch.Tensor) -> None:
        x = dense_flat(x.detach().float())
        if not x.numel():
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        top = max(-lo, hi)
        if self.range == 0.0:
            self.range = top if top > 0 else 1.0
        while top >= self.range and top > 0:
            self._double()
        # bin = floor(|x| * bins / range); doubling the range halves the factor exactly, so bins merge exactly.
        # Chunks of HIST_CHUNK values keep the temporaries in cache (int32 indices, then bincount).
        factor = self.bins / self.range
        counts = torch.zeros(self.bins, dtype=torch.int64)
        for chunk in x.split(HIST_CHUNK):
            idx = (chunk.abs() * factor).to(torch.int32).clamp_(max=self.bins - 1)
            counts += torch.bincount(idx, minlength=self.bins)
        self.counts += counts.double()

    def _double(self) -> None:
        """Range x2: pairs of bins merge exactly into one."""
        self.counts = torch.cat([self.counts.view(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.float64)])
        self.range *= 2

    def resampled(self, target: int) -> Histogram:
        """This histogram over [0, max|x|] only, at ``target`` to 2 x ``target`` bins (merging bins exactly).

        The stored range can be up to twice the data's (it doubles), so the data may cover as little as half the
        stored bins; the threshold searches should see the data's own range at the stated resolution, as
        TensorRT's 2048 bins over [0, amax] do.  Store more bins than the target (``QuantSpec`` stores 4x).
        """
        top = max(abs(self.min), abs(self.max))
        counts, width = self.counts, self.width
        if not math.isfinite(top) or width == 0:
            return self
        covered = min(int(top / width) + 1, counts.numel())
        while covered >= 2 * target and counts.numel() % 2 == 0:
            counts, width = counts.view(-1, 2).sum(1), width * 2
            covered = min(int(top / width) + 1, counts.numel())
        out = Histogram.__new__(Histogram)
        out.bins, out.range, out.counts = covered, covered * width, counts[:covered].clone()
        out.counts[-1] += counts[covered:].sum()  # nothing lies there; kept so the mass is exact
        out.min, out.max = self.min, self.max
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

    def mse(self, levels: int) -> float:
        """Threshold t minimising E[(x - q(x))^2]: rounding error t^2/(12 L^2) per clipped-in sample plus the
        squared excess of clipped samples (bin centres as values)."""
        centers = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width
        candidates = self.edges()
        errors = []
        for start in range(0, self.bins, CANDIDATE_CHUNK):
            t = candidates[start:start + CANDIDATE_CHUNK, None]
            step = t / (levels - 1 if levels > 1 else 1)
            inside = centers[None] <= t
            err = torch.where(inside, step ** 2 / 12, (centers[None] - t) ** 2) * self.counts[None]
            errors.append(err.sum(1))
        return float(candidates[int(torch.argmin(torch.cat(errors)))])

    def kl_divergences(self, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate thresholds in bins, KL(P || Q) for each), candidates from ``levels`` to ``bins``.

        As in TensorRT's calibrator, the first bin's count is replaced by the second's: after a ReLU half of the
        values can be exact zeros, and that spike, spread over the first quantization level's bins, would dominate
        every divergence and pull the threshold down to the smallest candidate.
        """
        h = self.counts.clone()
        h[0] = h[1]
        cands = torch.arange(levels, self.bins + 1)
        out = []
        for start in range(0, cands.numel(), CANDIDATE_CHUNK):
            out.append(_kl_block(h, cands[start:start + CANDIDATE_CHUNK], levels))
        return cands, torch.cat(out)

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


def _kl_block(h: torch.Tensor, cands: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) for each candidate i in ``cands``, in closed form over the ``levels`` groups.

    P: bins [0, i) with the tail (bins >= i) folded into bin i-1.  Q: bins [0, i) without the tail merged into
    ``levels`` groups of i // levels bins (the last takes the remainder), each group's mass spread evenly over the
    bins where P is non-zero.  Because Q is constant on a group's non-zero bins,
    KL = sum_j P_j log P_j - sum_g P(g) log(mass_g / (nonzero_g * C_i)), with C_i the mass of bins [0, i):
    prefix sums give every term, so the search costs O(candidates x levels), not x bins.
    A candidate where P has mass and Q none is infinitely bad.
    """
    t = float(h.sum())
    cum = torch.cat([torch.zeros(1, dtype=h.dtype), torch.cumsum(h, 0)])
    hlogh = torch.where(h > 0, h * torch.log(h.clamp(min=1e-300)), torch.zeros((), dtype=h.dtype))
    cum_hlogh = torch.cat([torch.zeros(1, dtype=h.dtype), torch.cumsum(hlogh, 0)])
    cum_nz = torch.cat([torch.zeros(1, dtype=h.dtype), torch.cumsum((h > 0).to(h.dtype), 0)])
    i = cands
    tail = cum[-1] - cum[i]
    last = h[i - 1] + tail  # P's last bin, unnormalised
    # sum_j P_j log P_j with P = h / t (last bin folded)
    plogp = (cum_hlogh[i - 1] + torch.where(last > 0, last * torch.log(last.clamp(min=1e-300)), 0.0)) / t \
        - torch.log(torch.tensor(t, dtype=h.dtype))
    m = torch.div(i, levels, rounding_mode="floor")[:, None]
    g = torch.arange(levels)[None, :]
    lo = g * m
    hi = torch.where(g == levels - 1, i[:, None], lo + m)
    mass = cum[hi] - cum[lo]
    nonzero = cum_nz[hi] - cum_nz[lo]
    is_last = g == levels - 1
    extra = ((h[i - 1] == 0) & (tail > 0)).to(h.dtype)[:, None]  # the folded tail makes P non-zero there
    nonzero = nonzero + torch.where(is_last, extra, torch.zeros((), dtype=h.dtype))
    p_group = (mass + torch.where(is_last, tail[:, None], torch.zeros((), dtype=h.dtype))) / t
    c_i = cum[i][:, None]
    log_q = torch.log(mass.clamp(min=1e-300)) - torch.log(nonzero.clamp(min=1)) - torch.log(c_i.clamp(min=1e-300))
    impossible = ((p_group > 0) & (mass == 0)).any(1)
    cross = torch.where(p_group > 0, p_group * log_q, torch.zeros((), dtype=h.dtype)).sum(1)
    kl = plogp - cross
    return torch.where(impossible, torch.full_like(kl, math.inf), kl)
