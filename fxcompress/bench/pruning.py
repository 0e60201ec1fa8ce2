"""Structural pruning benchmark: fxcompress against Torch-Pruning in the same run.

For each model: the time of analysis + selection + removal (fxcompress: the three passes, and ``compile`` end to
end: copy, trace, checks, passes, totals; Torch-Pruning: ``MetaPruner`` construction + ``step()``, its whole job), params and MACs before and after (both pruned
models counted by the same counter), and PyTorch latency (1 thread, contenders alternated).  L1 criterion, the
same ratio, the classifier excluded, per-layer (local) ratios.

    python -m fxcompress.bench.pruning                      # golden CNNs, residual chains, dense blocks
    python -m fxcompress.bench.pruning --models resnet50 --chains 8,16 --dense 8 --runs 3 --json out.json
    python -m fxcompress.bench.pruning --scaling            # compile time against depth, checks off and on

``--scaling`` compiles ``prune`` (ratio 0.5) end to end on residual chains of 64 to 512 blocks and the 96-layer dense
block, alternating the models run by run, with the checks off (``verify=False, check_numerics=False``) and with the
default checks, and reports medians and the growth per doubling of depth.

Torch-Pruning is a bench-only dependency (``pip install torch-pruning``); without it only fxcompress is timed.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from tabulate import tabulate

import fxcompress as fxc
from fxcompress import counting

from .measure import alternated_latency, cpu_model

GOLDEN = ["resnet18", "resnet50", "mobilenet_v2", "resnext50", "densenet121", "vgg11_bn", "unet"]
CHAINS = [8, 16, 32, 64, 128, 256, 512]
DENSE = [8, 16, 32, 64, 96]


class ResidualChain(nn.Module):
    """N residual blocks (conv-bn-relu-conv-bn + identity) on a 16-channel 8x8 stream."""

    def __init__(self, blocks: int, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)) for _ in range(blocks))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


class DenseBlock(nn.Module):
    """N densely connected layers: each sees the concat of the stem and every earlier layer's output."""

    def __init__(self, layers: int, growth: int = 8, stem: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        self.layers = nn.ModuleList(nn.Sequential(
            nn.BatchNorm2d(stem + i * growth), nn.ReLU(), nn.Conv2d(stem + i * growth, growth, 3, padding=1,
                                                                    bias=False)) for i in range(layers))
        self.fc = nn.Linear(stem + layers * growth, 10)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.fc(torch.cat(feats, 1).mean((2, 3)))


def _model(spec: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    if spec.startswith("chain") and spec[5:].isdigit():
        torch.manual_seed(0)
        return ResidualChain(int(spec[5:])).eval(), (torch.randn(1, 3, 8, 8),), "fc"
    if spec.startswith("dense") and spec[5:].isdigit():
        torch.manual_seed(0)
        return DenseBlock(int(spec[5:])).eval(), (torch.randn(1, 3, 8, 8),), "fc"
    model, x = fxc.golden.load(spec)
    last = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return model, x, last


def ours(model: nn.Module, x: tuple, ratio: float, classifier: str) -> tuple[nn.Module, dict[str, float]]:
    start = time.perf_counter()
    result = fxc.compile(model, x, [{"pass": "prune", "ratio": ratio, "criterion": "l1", "exclude": [classifier]}],
                         verify=False, check_numerics=False)
    total = time.perf_counter() - start
    seconds = {h.name: h.seconds for h in result.history}
    seconds["passes"] = sum(seconds.values())
    seconds["trace"] = result.trace.seconds
    seconds["end_to_end"] = total
    return result.module, seconds


def torch_pruning(model: nn.Module, x: tuple, ratio: float, classifier: str) -> tuple[nn.Module, dict[str, float]]:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                                  ignored_layers=[model.get_submodule(classifier)])
    built = time.perf_counter()
    pruner.step()
    end = time.perf_counter()
    return model, {"init": built - start, "step": end - built, "passes": end - start}


def _have_tp() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def _repeat(fn: Callable[[], tuple[nn.Module, dict]], runs: int, budget: float) -> tuple[nn.Module, dict]:
    """Median of up to ``runs`` runs, stopping early once ``budget`` seconds are spent (slow contenders)."""
    samples, spent, module = [], 0.0, None
    for _ in range(runs):
        gc.collect()
        module, seconds = fn()
        samples.append(seconds)
        spent += seconds.get("end_to_end", seconds["passes"])
        if spent > budget:
            break
    return module, {k: statistics.median(s[k] for s in samples) for k in samples[0]} | {"runs": len(samples)}


def bench_one(spec: str, ratio: float, runs: int, latency_runs: int, budget: float, log) -> dict[str, Any]:
    model, x, classifier = _model(spec)
    before = counting.totals(fxc.trace(model, x))
    row: dict[str, Any] = {"model": spec, "params": before.params, "macs": before.macs}
    pruned, t_ours = _repeat(lambda: ours(model, x, ratio, classifier), runs, budget)
    after = counting.totals(fxc.trace(pruned, x))
    row["ours"] = {"seconds": t_ours, "params": after.params, "macs": after.macs}
    contenders = {"fp32": lambda: model(*x), "ours": lambda: pruned(*x)}
    if _have_tp():
        tp_model, t_tp = _repeat(lambda: torch_pruning(model, x, ratio, classifier), runs, budget)
        tp_after = counting.totals(fxc.trace(tp_model, x))
        row["torch_pruning"] = {"seconds": t_tp, "params": tp_after.params, "macs": tp_after.macs}
        contenders["torch_pruning"] = lambda: tp_model(*x)
    with torch.no_grad():
        row["latency_ms"] = {k: v * 1e3 for k, v in alternated_latency(contenders, latency_runs).items()}
    log(f"{spec}: ours {t_ours['end_to_end']:.3f} s end to end"
        + (f", torch-pruning {row['torch_pruning']['seconds']['passes']:.3f} s" if "torch_pruning" in row else ""))
    return row


def run(models: list[str], ratio: float = 0.5, runs: int = 5, latency_runs: int = 20, budget: float = 20.0,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows = [bench_one(spec, ratio, runs, latency_runs, budget, log) for spec in models]
    return {"ratio": ratio, "threads": 1, "torch_pruning": _tp_version(), "rows": rows}


def _tp_version() -> str | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    return getattr(tp, "__version__", "unknown")


def format_table(report: dict[str, Any]) -> str:
    head = ["model", "params", "GMACs", "ours: s (passes)", "ours: s (end to end)", "TP: s", "ours/TP (end to end)",
            "params after (ours / TP)", "GMACs after (ours / TP)", "ms fp32 / ours / TP"]
    body = []
    previous: dict[str, float] = {}
    for r in report["rows"]:
        o, t = r["ours"], r.get("torch_pruning")
        lat = r["latency_ms"]
        body.append([
            r["model"], f"{r['params'] / 1e6:.2f} M", f"{r['macs'] / 1e9:.3f}",
            f"{o['seconds']['passes']:.3f}",
            f"{o['seconds']['end_to_end']:.3f}" + _growth(r["model"], o["seconds"]["end_to_end"], previous),
            f"{t['seconds']['passes']:.3f}" if t else "-",
            f"{o['seconds']['end_to_end'] / t['seconds']['passes']:.3f}" if t else "-",
            f"{o['params'] / 1e6:.3f} / {t['params'] / 1e6:.3f} M" if t else f"{o['params'] / 1e6:.3f} M",
            f"{o['macs'] / 1e9:.3f} / {t['macs'] / 1e9:.3f}" if t else f"{o['macs'] / 1e9:.3f}",
            " / ".join(f"{lat[k]:.2f}" for k in ("fp32", "ours", "torch_pruning") if k in lat),
        ])
    return tabulate(body, head, tablefmt="github")


def _growth(spec: str, seconds: float, previous: dict[str, float]) -> str:
    """For synthetic models, the time relative to the previous (smaller) one of the same family."""
    family = spec.rstrip("0123456789")
    if family not in ("chain", "dense"):
        return ""
    last, previous[family] = previous.get(family), seconds
    return f" ({seconds / last:.2f}x)" if last else ""


SCALING = ["chain64", "chain128", "chain256", "chain512", "dense96"]


def scaling(specs: list[str] = SCALING, runs: int = 7, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Median end-to-end compile seconds of ``prune`` per model, checks off and on, runs alternated across models."""
    torch.set_num_threads(1)
    models = {spec: _model(spec)[:2] for spec in specs}
    samples: dict[str, dict[str, list[float]]] = {spec: {"off": [], "on": []} for spec in specs}
    for i in range(runs):
        for spec, (model, x) in models.items():
            for checks in ("off", "on"):
                gc.collect()
                start = time.perf_counter()
                fxc.compile(model, x, [{"pass": "prune", "ratio": 0.5}], verify=checks == "on",
                            check_numerics=checks == "on")
                samples[spec][checks].append(time.perf_counter() - start)
        log(f"scaling: run {i + 1}/{runs}")
    return {"runs": runs, "rows": [{"model": spec, **{k: statistics.median(v) for k, v in samples[spec].items()}}
                                   for spec in specs]}


def format_scaling(report: dict[str, Any]) -> str:
    body, previous = [], {}
    for r in report["rows"]:
        body.append([r["model"], f"{r['off']:.3f}" + _growth(r["model"], r["off"], previous), f"{r['on']:.3f}",
                     f"{r['on'] / r['off']:.2f}"])
    return tabulate(body, ["model", "s, checks off (growth)", "s, default checks", "on / off"], tablefmt="github")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(GOLDEN), help="golden model names (comma separated, or 'none')")
    p.add_argument("--chains", default=",".join(map(str, CHAINS)), help="residual chain lengths ('none' to skip)")
    p.add_argument("--dense", default=",".join(map(str, DENSE)), help="dense block depths ('none' to skip)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--runs", type=int, default=None, help="timing runs per contender (median; 5, 7 with --scaling)")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--budget", type=float, default=20.0, help="stop repeating a contender after this many seconds")
    p.add_argument("--json", metavar="OUT.json")
    p.add_argument("--scaling", action="store_true", help="compile time against depth instead (see the docstring)")
    args = p.parse_args(argv)
    if args.scaling:
        report = scaling(runs=args.runs or 7, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"CPU: {cpu_model()}")
        print(format_scaling(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return

    def items(text: str, prefix: str = "") -> list[str]:
        return [] if text == "none" else [prefix + t for t in text.split(",") if t]

    specs = items(args.models) + items(args.chains, "chain") + items(args.dense, "dense")
    report = run(specs, args.ratio, args.runs or 5, args.latency_runs, args.budget,
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"CPU: {cpu_model()}")
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
