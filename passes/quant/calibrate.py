"""Run the calibration data through the observed model and turn each site's statistics into quantization parameters.

    before:  observers hold no statistics        after:  ctx.plans[QuantParams][site] = FakeQuant(scale, zero, ...)

Every batch of ``calibration_data`` is checked against the example inputs (count, dtype, shape after the batch
axis, finite values): a bad batch is an ``InputError`` naming the batch and the input.  Consecutive batches are
concatenated up to ``batch_size`` samples per forward (statistics do not depend on how samples are grouped; large
forwards are much faster than many small ones).  ``max_samples`` stops early.  Progress shows as a tqdm bar on a
terminal and as a line every 30 s in logs (``fxcompress.progress``); ``progress=False`` hides it.

Requires: ``quant_plan`` (insert_observers).  Contract: EXACT (the graph is not changed; observers record).
Stats: batches, samples, seconds (forwards and threshold search), peak memory growth, clipped sites, values that
were infinite or NaN (left out of the ranges, named in the notes).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterable, Iterator

import torch
import torch.fx
from fxcompress.passes.quant.insert_observers import HOLDER
from fxcompress.passes.quant.lib.quant_plan import QuantPlan
from fxcompress.passes.quant.lib.quant_spec import FakeQuant, QuantParams, qparams

from fxcompress import meta
from fxcompress.context import CompileContext
from fxcompress.errors import InputError, PassError, RecipeError, VerificationError
from fxcompress.modules import Observer
from fxcompress.pass_base import Contract, Pass, PassResult
from fxcompress.plans import graph_signature, replayed
from fxcompress.progress import progress

log = logging.getLogger(__name__)


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def checked_batches(data: Iterable | None, example_inputs: tuple, names: list[str]) -> Iterator[tuple]:
    """The batches of ``data`` as tuples of tensors, each checked against ``example_inputs``."""
    if data is None:
        raise InputError("[calibrate] no calibration_data: pass compile(model, inputs, recipe, "
                         "calibration_data=batches), an iterable of inputs shaped like the example inputs.")
    if isinstance(data, (torch.Tensor, str, bytes)):
        raise InputError("[calibrate] calibration_data must be an iterable of batches (a list of tensors or of "
                         f"tuples), got a {type(data).__name__}; wrap a single batch in a list.")
    try:
        iterator = iter(data)
    except TypeError:
        raise InputError(f"[calibrate] calibration_data must be iterable, got {type(data).__name__}.") from None
    count = 0
    for i, batch in enumerate(iterator):
        inputs = (batch,) if isinstance(batch, torch.Tensor) else batch
        if not isinstance(inputs, (tuple, list)) or len(inputs) != len(example_inputs):
            got = f"{len(inputs)} inputs" if isinstance(inputs, (tuple, list)) else f"a {type(batch).__name__}"
            raise InputError(f"[calibrate] calibration batch {i} has {got}; the model takes {len(example_inputs)} "
                             f"({', '.join(names)}): yield a tensor or a tuple like the example inputs.")
        for name, x, ex in zip(names, inputs, example_inputs):
            where = f"[calibrate] calibration batch {i}, input {name!r}"
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{where} is a {type(x).__name__}, not a tensor.")
            if x.dtype != ex.dtype:
                raise InputError(f"{where} has dtype {x.dtype}; the model was traced with {ex.dtype}. "
                                 f"Convert it (x.to({ex.dtype})).")
            if x.dim() != ex.dim() or x.shape[1:] != ex.shape[1:]:
                raise InputError(f"{where} has shape {list(x.shape)}; the example input has {list(ex.shape)} "
                                 f"(only the batch axis, 0, may differ).")
            if x.shape[0] == 0:
                raise InputError(f"{where} holds no samples (batch axis of size 0).")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                raise InputError(f"{where} contains {bad} NaN/Inf values; calibration needs finite data.")
            if count == 0 and x.is_floating_point():
                _check_scale(where, x, ex)
        count += 1
        yield tuple(x.clone() for x in inputs)  # the model may write to its inputs: never to the caller's batches
    if count == 0:
        raise InputError("[calibrate] calibration_data is empty: it yielded no batch.")


SCALE_RATIO = 30.0  # calibration data this many times larger or smaller than the example inputs is a mistake


def _check_scale(where: str, x: torch.Tensor, example: torch.Tensor) -> None:
    """Calibration data on another scale than the example inputs (images in 0..255 for a model traced on
    normalised ones) would give scales that fit neither: an InputError naming both ranges."""
    if not x.numel() or not example.numel():  # no values to compare (a detector's piece traced on zero proposals)
        return
    got, want = float(x.abs().max()), float(example.abs().max())
    if got > 0 and want > 0 and not 1 / SCALE_RATIO <= got / want <= SCALE_RATIO:
        raise InputError(f"{where} reaches |x| = {got:.4g}, the example input {want:.4g}: a factor of "
                         f"{max(got / want, want / got):.0f} apart. Calibration data must be preprocessed as the model's "
                         f"inputs are (same normalisation); if it is, trace with an example drawn from it "
                         f"(example_inputs = the first calibration batch).")


def calibration_batches(ctx: CompileContext) -> Iterator[tuple]:
    """``ctx.calibration_data`` checked batch by batch against the example inputs (``checked_batches``)."""
    names = [n.target for n in ctx.gm.graph.nodes if n.op == "placeholder"]
    return checked_batches(ctx.calibration_data, ctx.example_inputs, names)


def grouped(batches: Iterator[tuple], batch_size: int) -> Iterator[tuple[tuple, int]]:
    """Consecutive batches concatenated to about ``batch_size`` samples: (inputs, number of batches)."""
    pending: list[tuple] = []
    samples = 0
    for batch in batches:
        pending.append(batch)
        samples += batch[0].shape[0]
        if samples >= batch_size:
            yield _cat(pending), len(pending)
            pending, samples = [], 0
    if pending:
        yield _cat(pending), len(pending)


def _cat(batches: list[tuple]) -> tuple:
    if len(batches) == 1:
        return batches[0]
    return tuple(torch.cat(parts) for parts in zip(*batches))


class Calibrate(Pass):
    """Run calibration data through the observers and compute every site's scale and zero point."""

    name = "calibrate"
    produces = (QuantParams,)
    contract = Contract.EXACT
    writes_tensors = True  # observers record ranges into their buffers
    requires = (QuantPlan,)

    def __init__(self, batch_size: int = 16, max_samples: int | None = None, progress: bool | None = None,
                 channels_last: bool | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise RecipeError(f"calibrate: batch_size must be a positive integer, got {batch_size!r}.")
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise RecipeError(f"calibrate: max_samples must be a positive integer or None, got {max_samples!r}.")
        self.batch_size, self.max_samples, self.progress = batch_size, max_samples, progress
        self.channels_last = channels_last

    def verify(self, ctx: CompileContext) -> None:
        """Every scale is for a planned site, positive and finite, and its zero point lies in its integer range."""
        plan, params = ctx.plans[QuantPlan], ctx.plans[QuantParams]
        for name, fq in params.items():
            if name not in plan.sites:
                raise VerificationError(f"[{self.name}] computed parameters for {name!r}, which the plan has not.")
            if not bool(torch.isfinite(fq.scale).all() and (fq.scale > 0).all()):
                raise VerificationError(f"[{self.name}] site {name} has scale {fq.scale.tolist()}.")
            if not bool(((fq.zero >= fq.qmin) & (fq.zero <= fq.qmax)).all()):
                raise VerificationError(f"[{self.name}] site {name}: zero point {fq.zero.tolist()} outside "
                                        f"[{fq.qmin}, {fq.qmax}].")

    def run(self, ctx: CompileContext) -> PassResult:
        gm, plan = ctx.gm, ctx.plans[QuantPlan]
        holder = getattr(gm, HOLDER, None)
        if holder is None:
            if plan.sites:
                raise PassError(f"[{self.name}] the module has no observers; run insert_observers first.")
            ctx.plans[QuantParams] = QuantParams({}, graph_signature(gm))
            return PassResult(False, {"sites": 0}, ("nothing to calibrate: the plan has no quantized tensor",))
        observers: dict[str, Observer] = dict(holder.named_children())
        given = replayed(ctx, QuantParams, self.name)
        if given is not None:
            unknown = sorted(set(given) - set(observers))
            if unknown:
                raise InputError(f"[{self.name}] the given quant_params name sites this module does not observe: "
                                 f"{', '.join(unknown[:5])}.")
            ctx.plans[QuantParams] = given
            return PassResult(False, {"replayed": True, "sites": len(given)},
                              (f"applied the given quant_params ({len(given)} sites); no data was run",))
        for obs in observers.values():
            obs.enabled = True
        rss0, reset = _proc_status_mb("VmRSS"), _reset_peak_rss()
        start = time.perf_counter()
        batches = samples = 0
        total = len(ctx.calibration_data) if hasattr(ctx.calibration_data, "__len__") else None
        with torch.no_grad(), forward_layout(gm, ctx.example_inputs, self.channels_last) as layout, \
                progress(total, "calibrate", "batch", self.progress) as bar:
            for inputs, n in grouped(calibration_batches(ctx), self.batch_size):
                gm(*(layout(t) for t in inputs))
                batches, samples = batches + n, samples + inputs[0].shape[0]
                bar.update(n)
                if self.max_samples is not None and samples >= self.max_samples:
                    break
        forward_seconds = time.perf_counter() - start
        params, notes, clipped, nonfinite = {}, [], 0, 0
        for name, obs in observers.items():
            site = plan.sites[name]
            if obs.batches == 0:
                notes.append(f"{name} ({', '.join(site.values)}) saw no data; it stays float")
                continue
            scale, zero = qparams(site.spec, obs.calibrator)
            params[name] = FakeQuant.of(site.spec, scale, zero, storage_unsigned=True)
            clipped += int(_clips(obs, params[name]))
            if obs.calibrator.nonfinite:
                nonfinite += obs.calibrator.nonfinite
                notes.append(f"{name} ({', '.join(site.values)}) saw {obs.calibrator.nonfinite} infinite or NaN "
                             f"values: left out of its range, they saturate at its ends (a -inf padding before a "
                             f"max pool is harmless; anything else means the model overflows on this data)")
        ctx.plans[QuantParams] = QuantParams(params, graph_signature(gm))
        seconds = time.perf_counter() - start
        peak = _proc_status_mb("VmHWM")
        stats: dict[str, Any] = {
            "batches": batches, "samples": samples, "sites": len(params), "clipped_sites": clipped,
            "nonfinite_values": nonfinite,
            "forward_seconds": round(forward_seconds, 3), "search_seconds": round(seconds - forward_seconds, 3),
            "calibrator_kb": round(sum(_nbytes(o) for o in observers.values()) / 1024, 1),
        }
        if peak is not None and rss0 is not None:
            stats["peak_memory_mb" if reset else "peak_rss_mb"] = round(peak - rss0 if reset else peak, 1)
        log.info("calibrated %d sites on %d samples in %.2f s", len(params), samples, seconds)
        return PassResult(modified=False, stats=stats, notes=tuple(notes))


@contextlib.contextmanager
def forward_layout(gm: torch.fx.GraphModule, example_inputs: tuple, channels_last: bool | None = None):
    """For forwards over calibration data: yields the function that lays out each input, channels-last when the
    model has 4-d inputs and runs so (PyTorch's CPU convolutions and pooling are faster; values do not change), else
    the identity; the module's parameters go back to the default layout on exit.

    ``channels_last=None`` decides by a forward of the example inputs: a model whose ``view`` needs contiguous
    tensors fails there and stays in the default layout.  ``True`` raises that failure, ``False`` never converts.
    """
    converted = False
    if channels_last is not False and any(t.dim() == 4 for t in example_inputs):
        try:
            gm.to(memory_format=torch.channels_last)
            with meta.side_effect_free(gm):
                gm(*(_channels_last(t) for t in example_inputs))
            converted = True
        except Exception:  # noqa: BLE001 - any failure means: keep the default layout
            gm.to(memory_format=torch.contiguous_format)
            if channels_last:
                raise
    if not converted:
        yield _same
        return
    try:
        yield _channels_last
    finally:
        gm.to(memory_format=torch.contiguous_format)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _clips(obs: Observer, fq: FakeQuant) -> bool:
    """Whether the chosen per-tensor range cuts off observed values by more than half a step."""
    if fq.axis is not None:
        return False
    lo, hi = float(obs.calibrator.min), float(obs.calibrator.max)
    scale, zero = float(fq.scale), int(fq.zero)
    return lo < (fq.qmin - zero - 0.5) * scale or hi > (fq.qmax - zero + 0.5) * scale


def _nbytes(obs: Observer) -> int:
    cal = obs.calibrator
    tensors = [getattr(cal, k, None) for k in ("counts", "min", "max")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
