"""``python -m fxcompress.bench.zoo``: the conformance suite on third-party models, beside Torch-Pruning.

    python -m fxcompress.bench.zoo [--suites torchvision segmentation detection timm hf] [--models SPEC ...]
                                   [--ratio 0.3] [--timeout 900] [--json out.json] [--readme README.md]

Every torchvision classification, segmentation and detection model, the smallest variant of every timm family
(fewest parameters, measured on the meta device; timm's ``test_*`` models left out) and a list of Hugging Face
architectures in small configurations, all with random weights and randomised BatchNorm statistics (no downloads).
Each model runs in its own process with a timeout through the steps of the coverage table:

- **trace**: ``compile`` with ``fold_bn`` makes a graph (symbolic tracing, or torch.export when that fails);
- **fold**: the folded model's outputs equal the model's to 1e-5 of the output scale (largest absolute output);
- **prune**: ``prune`` at ``--ratio`` ran in mask mode and in remove mode;
- **remove = mask**: their outputs agree to 1e-4 of the output scale, or the pass reported an inexact group;
- **export**: the pruned model exported to ONNX runs in ONNX Runtime within 1e-4 of the output scale;
- **int8**: ``quantize`` (static for images, dynamic for token inputs) exports and runs in ONNX Runtime;
- **torch-pruning**: Torch-Pruning's ``MetaPruner`` (L1 magnitude, same ratio, last layer ignored) ran.

Also recorded: the share of channels in prunable groups, the MACs kept by both tools at the ratio (counted by the
same counter), the graph's front end, and the first line of every failure.  A cell is ``ok``, ``inexact`` (remove
differs from mask where the pass said it would), ``-`` (an earlier step failed) or ``FAIL``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tabulate import tabulate
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

import fxcompress as fxc

from .. import pieces
from ..counting import totals
from ..tracing import trace
from .measure import cpu_model

STEPS = ("trace", "fold", "prune", "remove = mask", "export", "int8", "torch-pruning")
SUITES = ("torchvision", "segmentation", "detection", "timm", "hf")
FOLD_TOL, REMOVE_TOL, ORT_TOL = 1e-5, 1e-4, 1e-4
README_BEGIN, README_END = "<!-- zoo:begin -->", "<!-- zoo:end -->"

_TEXT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_IMAGE = dict(image_size=64, num_channels=3)


def _hf_configs() -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """name -> (factory of a small randomly initialised model, input kind)."""
    import transformers as t

    return {
        "bert": (lambda: t.BertModel(t.BertConfig(**_TEXT)), "text"),
        "distilbert": (lambda: t.DistilBertModel(t.DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4,
                                                                    hidden_dim=128)), "text"),
        "roberta": (lambda: t.RobertaModel(t.RobertaConfig(**_TEXT, pad_token_id=1)), "text"),
        "albert": (lambda: t.AlbertModel(t.AlbertConfig(**_TEXT, embedding_size=32)), "text"),
        "gpt2": (lambda: t.GPT2Model(t.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, use_cache=False,
                                                  bos_token_id=0, eos_token_id=0)), "text"),
        "opt": (lambda: t.OPTModel(t.OPTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                               num_attention_heads=4, word_embed_proj_dim=64, use_cache=False,
                                               pad_token_id=1)), "text"),
        "llama": (lambda: t.LlamaModel(t.LlamaConfig(**_TEXT, num_key_value_heads=2, use_cache=False)), "text"),
        "t5-encoder": (lambda: t.T5EncoderModel(t.T5Config(vocab_size=1000, d_model=64, d_kv=16, d_ff=128,
                                                           num_layers=2, num_heads=4, use_cache=False)), "text"),
        "vit": (lambda: t.ViTModel(t.ViTConfig(**_IMAGE, patch_size=16, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=128)), "image"),
        "swin": (lambda: t.SwinModel(t.SwinConfig(**_IMAGE, patch_size=4, embed_dim=32, depths=[1, 1],
                                                  num_heads=[2, 4], window_size=4)), "image"),
        "convnext": (lambda: t.ConvNextModel(t.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1],
                                                              num_stages=2)), "image"),
        "resnet": (lambda: t.ResNetModel(t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                        layer_type="basic")), "image"),
        "wav2vec2": (lambda: t.Wav2Vec2Model(t.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=128,
                                                              conv_dim=(32, 32), conv_stride=(5, 4),
                                                              conv_kernel=(10, 8),
                                                              num_conv_pos_embeddings=16,
                                                              num_conv_pos_embedding_groups=4)), "audio"),
        "whisper-encoder": (lambda: t.WhisperModel(t.WhisperConfig(
            vocab_size=1000, d_model=64, encoder_layers=2, encoder_attention_heads=4, decoder_layers=1,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
            max_source_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
            suppress_tokens=[], begin_suppress_tokens=[])).get_encoder(), "mel"),
    }


HF_MODELS = ("bert", "distilbert", "roberta", "albert", "gpt2", "opt", "llama", "t5-encoder", "vit", "swin",
             "convnext", "resnet", "wav2vec2", "whisper-encoder")


def randomize_bn(model: nn.Module, seed: int = 0, mean: float = 0.1, var: tuple[float, float] = (0.5, 1.5),
                 weight: tuple[float, float] = (0.8, 1.2), bias: float = 0.1) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, in place (folding the defaults, mean 0 and variance 1,
    proves little): means and biases normal with the given spreads, variances and weights uniform in the ranges."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * mean)
                    m.running_var.copy_(torch.rand(n, generator=g) * (var[1] - var[0]) + var[0])
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * (weight[1] - weight[0]) + weight[0])
                    m.bias.copy_(torch.randn(n, generator=g) * bias)
    return model


def randomize_quiet_parameters(model: nn.Module, seed: int = 0) -> list[str]:
    """Redraw, in place, the parameters a fresh model initialises so that parts of it do not reach the output: an
    all-zero weight matrix or kernel (torchvision ViT's head: every output 0, so every comparison would hold) gets
    PyTorch's default uniform draw; a constant tiny non-bias tensor (layer scale at 1e-5, a zero gate) gets values
    uniform in [0.5, 1.5], so a branch a wrong rewrite breaks moves the output.  Returns the names redrawn."""
    g = torch.Generator().manual_seed(seed)
    redrawn = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0 or name.endswith("bias"):
                continue
            flat = p.detach().reshape(-1)
            if p.dim() >= 2 and not bool(flat.any()):
                bound = 1.0 / max(p[0].numel(), 1) ** 0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif bool((flat == flat[0]).all()) and float(flat[0].abs()) < 1e-3:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                continue
            redrawn.append(name)
    return redrawn


def _hf_inputs(kind: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "text":
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0
        return {"input_ids": torch.randint(2, 1000, (2, 12), generator=g), "attention_mask": mask}
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 64, 64, generator=g)}
    if kind == "audio":
        return {"input_values": torch.randn(2, 1600, generator=g)}
    return {"input_features": torch.randn(2, 16, 64, generator=g)}


def build(spec: str, seed: int = 1) -> tuple[nn.Module, Any, Callable[[int], Any]]:
    """(model in eval mode, example inputs, sampler of further inputs by seed) of ``suite:name``."""
    suite, _, name = spec.partition(":")
    torch.manual_seed(0)
    if suite == "hf":
        factory, kind = _hf_configs()[name]
        model = factory().eval()
        randomize_quiet_parameters(model)
        return model, _hf_inputs(kind, seed), lambda s: _hf_inputs(kind, s)
    if suite == "timm":
        import timm
        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    elif suite in ("torchvision", "segmentation", "detection"):
        import torchvision
        extra = {} if suite == "torchvision" else {"num_classes": 5, "weights_backbone": None}
        if suite == "detection" and not name.startswith("ssd"):  # SSD fixes its own input size
            extra.update(min_size=224, max_size=224)
        model = torchvision.models.get_model(name, weights=None, **extra)
        size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    else:
        raise SystemExit(f"unknown suite {suite!r} in {spec!r}: one of {', '.join(SUITES)}")
    randomize_bn(model.eval())
    randomize_quiet_parameters(model)

    def sample(s: int) -> Any:
        x = torch.randn((1, *size), generator=torch.Generator().manual_seed(s))
        return ([x[0]],) if suite == "detection" else (x,)
    return model, sample(seed), sample


def catalogue(suite: str) -> list[str]:
    """Model specs of a suite, in a fixed order."""
    if suite == "hf":
        return [f"hf:{n}" for n in HF_MODELS]
    if suite == "timm":
        return [f"timm:{n}" for n in smallest_timm_models()]
    import torchvision.models as tvm
    module = {"torchvision": tvm, "segmentation": tvm.segmentation, "detection": tvm.detection}[suite]
    return [f"{suite}:{n}" for n in tvm.list_models(module=module)]


def smallest_timm_models() -> list[str]:
    """The model with the fewest parameters of every timm module (built on the meta device: no memory, no data)."""
    import timm
    chosen = []
    for module in timm.list_modules():
        best: tuple[int, str] | None = None
        for name in timm.list_models(module=module):
            if name.startswith("test_"):
                continue
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
            except Exception:  # noqa: BLE001  (a variant that cannot be built is no family's smallest)
                continue
            n = sum(p.numel() for p in model.parameters())
            if best is None or n < best[0]:
                best = (n, name)
        if best is not None:
            chosen.append(best[1])
    return chosen


def _call(model: nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _floats(out: Any) -> list[torch.Tensor]:
    return [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_error(got: Any, want: Any) -> float:
    """max |got - want| / max |want| over the floating-point leaves; inf when the structures or shapes differ."""
    a, b = _floats(got), _floats(want)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    if not b:
        return 0.0
    if not any(bool(y.any()) for y in b):
        raise ValueError("the reference output is all zeros: a comparison with it proves nothing (a zero-initialised "
                         "layer that randomize_quiet_parameters did not redraw?)")
    scale = max(float(y.abs().max()) if y.numel() else 0.0 for y in b) or 1.0
    return max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b)) / scale


def compare(result: Any, reference: nn.Module, inputs: Any) -> float:
    """``relative_error`` of a compiled module against ``reference`` (the model, or another compiled module); for
    a model compiled piece by piece, the largest over its pieces, each on what it receives: the rest is the model's
    own code, and its outputs (detections: top-k and NMS over near-equal scores of random weights) reorder on any
    rounding."""
    if result.trace.front_end != "pieces":
        return relative_error(_call(result.module, inputs), _call(reference, inputs))
    prefix = "module." if isinstance(reference, torch.fx.GraphModule) else ""  # a compiled one's holder
    calls = pieces.record_calls(reference, [tuple(inputs)])[0]
    errors = []
    for name in dict.fromkeys(h.piece for h in result.history):
        args = calls[prefix + name][0]
        errors.append(relative_error(_call(result.module.get_submodule("module." + name), args),
                                     _call(reference.get_submodule(prefix + name), args)))
    return max(errors)


def _first_line(exc: BaseException) -> str:
    """The exception's type and message, its lines joined, cut at 300 characters."""
    text = " / ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"[:300]


def _last_layer(model: nn.Module) -> nn.Module | None:
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1] if layers else None


def _prune_stats(result: Any) -> dict[str, Any]:
    """Share of channels in prunable groups, inexact groups and barrier ops (summed over the pieces)."""
    records = [h.stats for h in result.history if h.name == "propagate_dependencies"]
    total = {k: sum(r[k] for r in records) for k in ("channels", "prunable_channels", "inexact_groups", "barrier_ops")}
    return {"share": total["prunable_channels"] / max(total["channels"], 1), "inexact_groups": total["inexact_groups"],
            "barriers": total["barrier_ops"]}


def _ort_outputs(path: Path, inputs: Any) -> list:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options)
    names = [i.name for i in session.get_inputs()]
    flat = list(inputs.values()) if isinstance(inputs, dict) else pytree.tree_leaves(inputs)
    return session.run(None, {n: t.numpy() for n, t in zip(names, flat)})


def _ort_error(path: Path, inputs: Any, want: Any) -> float:
    got = [torch.from_numpy(o) for o in _ort_outputs(path, inputs) if o.dtype.kind == "f"]
    return relative_error(got, _floats(want))


@contextlib.contextmanager
def limits(seconds: float, gigabytes: float):
    """Raise ``TimeoutError`` or ``MemoryError`` in this (main) thread once ``seconds`` have passed or the process's
    resident memory exceeds ``gigabytes`` (checked every 0.2 s), instead of being killed by the system."""
    reason: list[BaseException] = []

    def interrupt(*_):
        raise reason[0]
    done = threading.Event()

    def watch() -> None:
        start = time.perf_counter()
        while not done.wait(0.2):
            if time.perf_counter() - start > seconds:
                reason.append(TimeoutError(f"still running after {seconds:g} s"))
            elif resident_gb() > gigabytes:
                reason.append(MemoryError(f"over {gigabytes:g} GB of memory"))
            else:
                continue
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
            return
    previous = signal.signal(signal.SIGUSR1, interrupt)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)


def resident_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def check(spec: str, ratio: float, work: Path, tp_seconds: float = 300.0, tp_gigabytes: float = 12.0,
          progress: Path | None = None) -> dict[str, Any]:
    """Run every step on one model; a step after a failed one it needs is ``-``.  Torch-Pruning gets
    ``tp_seconds`` and ``tp_gigabytes`` (it does not finish on some models, and fills the memory on others), so that
    its failure does not lose our row.  With ``progress``, the row so far is written there before and after every
    step (``running``: the step under way), so that a process killed on the way (out of memory, time-out) still
    tells what passed and where it stopped.  Each result is dropped once its steps are done: a model of a few GB
    must fit with its copies."""
    row: dict[str, Any] = {"model": spec, "steps": dict.fromkeys(STEPS, "-"), "errors": {}}
    steps, errors = row["steps"], row["errors"]

    def save() -> None:
        if progress is not None:
            progress.write_text(json.dumps(row))

    def attempt(step: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        row["running"] = step
        save()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001  (the suite records every failure and goes on)
            steps[step], errors[step] = "FAIL", _first_line(exc)
            row.setdefault("tracebacks", {})[step] = traceback.format_exc()[-2000:]
            value = None
        row.setdefault("seconds", {})[step] = round(time.perf_counter() - start, 2)
        del row["running"]
        save()
        return value

    def verdict(step: str, err: float, tol: float, inexact: bool = False) -> None:
        row.setdefault("errors_measured", {})[step] = err
        if err <= tol:
            steps[step] = "ok"
        elif inexact:
            steps[step] = "inexact"
        else:
            steps[step], errors[step] = "FAIL", f"relative error {err:.2e} > {tol:g}"

    model, inputs, sample = build(spec)
    folded = attempt("trace", lambda: fxc.compile(model, inputs, [{"pass": "fold_bn"}]))
    if folded is None:
        return row
    steps["trace"] = "ok"
    row["front_end"] = folded.trace.front_end
    row["auto_leaves"] = len(folded.trace.auto_leaves)
    verdict("fold", compare(folded, model, inputs), FOLD_TOL)
    del folded

    def prune(mode: str):
        return fxc.compile(model, inputs, [{"pass": "prune", "ratio": ratio, "mode": mode}])
    pruned = attempt("prune", lambda: (prune("mask"), prune("remove")))
    if pruned is not None:
        mask, removed = pruned
        steps["prune"] = "ok"
        row.update(_prune_stats(removed), macs_kept=removed.after.macs / max(removed.before.macs, 1))
        verdict("remove = mask", compare(removed, mask.module, inputs), REMOVE_TOL,
                inexact=row["inexact_groups"] > 0)
        del pruned, mask
        error = attempt("export", lambda: max(_ort_error(r.export_onnx(work / "pruned.onnx"), r.example_inputs,
                                                         _call(r.module, r.example_inputs))
                                              for r in (removed.pieces or {"": removed}).values()))
        if error is not None:
            verdict("export", error, ORT_TOL)
        del removed

    def int8() -> float:
        dynamic = isinstance(inputs, dict) and "input_ids" in inputs
        options = {"mode": "dynamic"} if dynamic else {}
        calibration = [tuple(s.values()) if isinstance(s, dict) else s for s in map(sample, range(2, 6))]
        q = fxc.compile(model, inputs, [{"pass": "quantize", **options}], calibration_data=calibration)
        for r in (q.pieces or {"": q}).values():  # a model compiled piece by piece: each piece in ORT
            _ort_outputs(r.export_onnx(work / "int8.onnx"), r.example_inputs)
        return 0.0
    if attempt("int8", int8) is not None:
        steps["int8"] = "ok"
    if _have_torch_pruning():
        def contender() -> float | None:
            with limits(tp_seconds, tp_gigabytes):
                return torch_pruning_macs(model, inputs, ratio)
        kept = attempt("torch-pruning", lambda: [contender()])  # [None]: it ran, its result did not trace
        if kept is not None:
            steps["torch-pruning"] = "ok"
            row["tp_macs_kept"] = kept[0]
    return row


def _have_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def torch_pruning_macs(model: nn.Module, inputs: Any, ratio: float) -> float | None:
    """Torch-Pruning's L1 ``MetaPruner`` at ``ratio`` (last layer ignored): the share of MACs it keeps, counted by
    the counter that counts ours (None when its pruned model no longer traces)."""
    import torch_pruning as tp
    model = copy.deepcopy(model)
    last = _last_layer(model)
    example = dict(inputs) if isinstance(inputs, dict) else tuple(inputs)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[last] if last is not None else [])
    try:
        before = totals(trace(model, inputs, share_tensors=True)).macs
    except Exception:  # noqa: BLE001  (a model we compile piece by piece: no whole graph to count on)
        before = None
    pruner.step()
    _call(model, inputs)
    if before is None:
        return None
    try:
        after = totals(trace(model, inputs, share_tensors=True)).macs
    except Exception:  # noqa: BLE001  (it ran; only its MACs are not counted)
        return None
    return after / max(before, 1)


def run_isolated(spec: str, ratio: float, timeout: float, tp_seconds: float = 300.0) -> dict[str, Any]:
    """``check`` in a fresh process, so that one model's crash, leak or hang cannot take the others down; a process
    that ends early gives the row it had written so far, the step under way failed with the reason."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        progress = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "fxcompress.bench.zoo", "--one", spec, "--ratio", str(ratio),
                   "--progress", str(progress), "--tp-seconds", str(tp_seconds)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                row = json.loads(lines[-1])
                row["seconds"]["total"] = round(time.perf_counter() - start, 1)
                return row
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            why = f"process ended with code {done.returncode}" + (
                " (killed: out of memory?)" if done.returncode == -signal.SIGKILL else "") + f": {tail[:300]}"
        except subprocess.TimeoutExpired:
            why = f"timed out after {timeout:g} s"
        row = json.loads(progress.read_text()) if progress.exists() else \
            {"model": spec, "steps": dict.fromkeys(STEPS, "-"), "errors": {}}
    step = row.pop("running", None)
    if step is not None:
        row["steps"][step] = "FAIL"
        row["errors"][step] = why
    else:
        row["errors"]["run"] = why
    row.setdefault("seconds", {})["total"] = round(time.perf_counter() - start, 1)
    return row


def step_passed(row: dict[str, Any], step: str) -> bool:
    return row["steps"][step] in ("ok", "inexact")


def coverage_table(rows: list[dict[str, Any]]) -> str:
    """Per suite: models tried and how many pass each step."""
    table = []
    for suite in SUITES:
        mine = [r for r in rows if r["model"].startswith(suite + ":")]
        if mine:
            table.append([suite, len(mine), *(sum(step_passed(r, s) for r in mine) for s in STEPS),
                          sum(all(step_passed(r, s) for s in STEPS[:-1]) for r in mine)])
    return tabulate(table, headers=["suite", "tried", *STEPS, "every step"], tablefmt="github")


def model_table(rows: list[dict[str, Any]]) -> str:
    """Per model: each step, the prunable share, MACs kept by us and by Torch-Pruning, the first failure."""
    def pct(x: float | None) -> str:
        return "" if x is None else f"{100 * x:.0f} %"
    table = []
    for r in rows:
        why = next(iter(r["errors"].items()), None)
        table.append([r["model"], *(r["steps"][s] for s in STEPS), pct(r.get("share")), pct(r.get("macs_kept")),
                      pct(r.get("tp_macs_kept")), "" if why is None else f"{why[0]}: {why[1]}"[:160]])
    return tabulate(table, headers=["model", *STEPS, "prunable", "MACs kept", "TP MACs kept", "first failure"],
                    tablefmt="github")


def write_readme(readme: Path, rows: list[dict[str, Any]], commands: list[str], header: str) -> None:
    """Replace the text between the zoo markers of ``readme`` with the tables of ``rows``, made by ``commands``."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} section to fill")
    made = "; ".join(f"`{c}`" for c in commands)
    body = (f"{README_BEGIN}\n{header}; made by {made}:\n\n{coverage_table(rows)}\n\n<details><summary>Per "
            f"model: each step, the share of channels in prunable groups, the MACs kept at the ratio (Torch-Pruning's "
            f"counted by the same counter), the first failure</summary>\n\n{model_table(rows)}\n\n</details>\n"
            f"{README_END}")
    pattern = re.escape(README_BEGIN) + ".*?" + re.escape(README_END)
    readme.write_text(re.sub(pattern, lambda _: body, text, flags=re.S))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m fxcompress.bench.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    parser.add_argument("--models", nargs="+", help="specs suite:name instead of whole suites (hf:bert, timm:...)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    parser.add_argument("--tp-seconds", type=float, default=300.0,
                        help="seconds Torch-Pruning gets per model (it hangs on some)")
    parser.add_argument("--json", type=Path, help="write every row (with tracebacks) here")
    parser.add_argument("--update", action="store_true",
                        help="keep the rows of --json for the models not run now (rerun some, tabulate all)")
    parser.add_argument("--resume", action="store_true",
                        help="with --update: run only the models that have no row in --json yet (an interrupted run)")
    parser.add_argument("--tabulate", action="store_true", help="run nothing: tabulate the rows of --json")
    parser.add_argument("--readme", type=Path, help="fill the README's zoo section with the tables")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, JSON on the last line
    parser.add_argument("--progress", type=Path, help=argparse.SUPPRESS)  # the child's row so far
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(check(args.one, args.ratio, Path(tmp), tp_seconds=args.tp_seconds,
                                   progress=args.progress)))
        return []
    if (args.update or args.tabulate) and not (args.json and args.json.exists()):
        parser.error("--update and --tabulate need --json naming an earlier run's file")
    if args.resume and not args.update:
        parser.error("--resume continues an earlier run: give it with --update and that run's --json")
    earlier = json.loads(args.json.read_text()) if args.update or args.tabulate else {"rows": [], "commands": []}
    rows = {r["model"]: r for r in earlier["rows"]}
    commands = list(earlier.get("commands", []))
    if not args.tabulate:
        commands.append("python -m fxcompress.bench.zoo " + " ".join(argv if argv is not None else sys.argv[1:]))
        specs = args.models or [s for suite in args.suites for s in catalogue(suite)]
        if args.resume:
            specs = [s for s in specs if s not in rows]
        for spec in specs:
            row = rows[spec] = run_isolated(spec, args.ratio, args.timeout, args.tp_seconds)
            print(f"{spec}: {' '.join(row['steps'][s] for s in STEPS)} ({row['seconds']['total']} s)"
                  + (f"  {row['errors']}" if row["errors"] else ""), flush=True)
            if args.json:
                report = {"cpu": cpu_model(), "torch": torch.__version__, "ratio": args.ratio, "commands": commands,
                          "rows": list(rows.values())}
                args.json.write_text(json.dumps(report, indent=1))
    order = {suite: i for i, suite in enumerate(SUITES)}
    table = sorted(rows.values(), key=lambda r: order[r["model"].partition(":")[0]])
    print(coverage_table(table))
    print(model_table(table))
    if args.readme:
        cpu = earlier.get("cpu", cpu_model())
        header = f"{cpu}, torch {earlier.get('torch', torch.__version__)}, ratio {earlier.get('ratio', args.ratio)}"
        write_readme(args.readme, table, commands, header)
    return table


if __name__ == "__main__":
    main()
