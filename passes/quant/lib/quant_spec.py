"""Quantization specs as data, and the scale / zero point a calibrated observer gives for them.

A ``QuantSpec`` says how one tensor is quantized: bit width, signed or unsigned integers, symmetric or affine,
per tensor or per channel (``axis``), and how its range is chosen (``method``):

    minmax        the observed range,
    percentile    the ``percentile``-th percentile of |x|,
    mse           the threshold minimising the expected squared error,
    kl            TensorRT's entropy calibration,
    kl_tolerance  the largest threshold whose KL is within ``tolerance`` x the smallest.

Histogram methods give a threshold T on |x|: a symmetric spec maps [-T, T] (signed) or [0, T] (unsigned);
an affine spec clips the observed [min, max] to [-T, T].  Every range contains 0, so zero is exact.
"""
from __future__ import annotations

import dataclasses

import torch
from fxcompress.passes.quant.lib.calibrators import Histogram, MinMax

from fxcompress.plans import Lifetime, Table, data_class

METHODS = ("minmax", "percentile", "mse", "kl", "kl_tolerance")


@data_class
@dataclasses.dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None  # per-channel axis, None for per tensor
    method: str = "minmax"
    tolerance: float = 1.3
    percentile: float = 99.999
    bins: int = 2048  # histogram resolution over the observed range of |x|

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be between 2 and 16, got {self.bits}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.axis is not None and self.method != "minmax":
            raise ValueError("per-channel specs use the minmax method")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def levels(self) -> int:
        """Quantization levels on one side of zero, as the KL search counts them (128 int8, 256 uint8)."""
        return 2 ** (self.bits - 1) if self.signed else 2 ** self.bits

    def calibrator(self) -> MinMax | Histogram:
        return MinMax(self.axis) if self.method == "minmax" else Histogram(4 * self.bins)  # see Histogram.resampled

    def __str__(self) -> str:
        kind = f"{'s' if self.signed else 'u'}{self.bits}"
        where = f"axis={self.axis}" if self.axis is not None else "per-tensor"
        extra = f", tolerance={self.tolerance}" if self.method == "kl_tolerance" else ""
        return f"{kind} {'symmetric' if self.symmetric else 'affine'} {where} {self.method}{extra}"


def threshold(spec: QuantSpec, hist: Histogram) -> float:
    """The clipping threshold on |x| the spec's histogram method picks.

    Levels per side of zero: an unsigned spec has all 2^bits on [0, T]; a signed one, and an affine one whose
    data has both signs, 2^(bits-1) (an affine spec over non-negative data is unsigned in effect).
    """
    if max(abs(hist.min), abs(hist.max)) == 0:
        return 0.0  # the tensor was zero on every sample: a zero range, quantized exactly
    hist = hist.resampled(spec.bins)
    levels = spec.levels
    if not spec.symmetric:
        levels = 2 ** (spec.bits - 1) if hist.min < 0 else 2 ** spec.bits
    if spec.method == "percentile":
        return hist.percentile(spec.percentile)
    if spec.method == "mse":
        return hist.mse(levels)
    if spec.method == "kl":
        return hist.kl(levels)
    return hist.kl(levels, spec.tolerance)


def qparams(spec: QuantSpec, cal: MinMax | Histogram) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for a calibrated observer: float32 scales, int32 zero points."""
    if isinstance(cal, MinMax):
        if cal.min is None:
            raise ValueError("the observer saw no data")
        lo, hi = cal.min.double(), cal.max.double()
    else:
        if hist_empty(cal):
            raise ValueError("the observer saw no data")
        t = threshold(spec, cal) if spec.method != "minmax" else max(abs(cal.min), abs(cal.max))
        lo = torch.tensor(max(cal.min, -t), dtype=torch.float64)
        hi = torch.tensor(min(cal.max, t), dtype=torch.float64)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)  # [-amax, amax] onto [-qmax, qmax] (signed) or [0, amax] onto [0, qmax]
        scale = _nonzero(amax / spec.qmax)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = _nonzero((hi - lo) / (spec.qmax - spec.qmin))
        zero = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax).to(torch.int32)
    return scale.float(), zero


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """A zero range (a tensor, or a weight channel, that is zero everywhere) gets scale 1, as ONNX Runtime's
    quantizer gives it: zero stays exact, and no multiplier or bias step underflows (a scale of float32's tiny made
    the requantization multiplier of the next layer overflow to infinity)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=torch.finfo(torch.float32).tiny)


def hist_empty(h: Histogram) -> bool:
    return float(h.counts.sum()) == 0


@data_class
@dataclasses.dataclass(frozen=True)
class FakeQuant:
    """What a fake-quantize node needs: scale, zero point and integer range, per tensor or along ``axis``.

    Activations are stored as uint8 (ONNX Runtime's fast U8S8 kernels): a signed activation spec is shifted by
    2^(bits-1) (zero point and range), which gives the same values.
    """

    scale: torch.Tensor  # float32, 0-d or 1-d
    zero: torch.Tensor  # int32, same shape
    qmin: int
    qmax: int
    axis: int | None = None

    @classmethod
    def of(cls, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor, storage_unsigned: bool) -> FakeQuant:
        qmin, qmax = spec.qmin, spec.qmax
        if storage_unsigned and spec.signed:
            shift = 2 ** (spec.bits - 1)
            qmin, qmax, zero = qmin + shift, qmax + shift, zero + shift
        return cls(scale.float(), zero.to(torch.int32), qmin, qmax, spec.axis)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero), self.qmin, self.qmax)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero, self.axis, self.qmin, self.qmax)

    def __str__(self) -> str:
        if self.axis is None:
            return f"scale={float(self.scale):.4g} zero={int(self.zero)} [{self.qmin}, {self.qmax}]"
        return f"{self.scale.numel()} scales along axis {self.axis} [{self.qmin}, {self.qmax}]"


@dataclasses.dataclass(frozen=True)
class QuantParams(Table):
    """{site name: FakeQuant}: the scale and zero point calibration chose for every observed site (sites that saw
    no data are absent and stay float).  The one source of every activation scale lower_quantized writes."""

    kind = "quant_params"
    owner = "calibrate"
    lifetime = Lifetime.RESULT
