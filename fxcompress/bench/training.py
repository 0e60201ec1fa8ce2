"""Accuracy recovered after pruning: each stage of prune -> recalibrate_bn -> finetune on the hard digits.

    python -m fxcompress.bench.training [--models NAME ...] [--ratio R] [--epochs N] [--json OUT.json]

For each trained model (default: the hard-digits ResNet-20 and MobileNetV2): test accuracy of fp32, then of the
model pruned with ``prune`` (L1, ``ratio`` of every group's channels, remove mode), after ``recalibrate_bn`` (BN
statistics re-estimated on 512 training images), and after ``finetune`` (``epochs`` epochs of SGD with cosine
schedule on the training split, batch 64, seed 0).  One compile per stage, so each row is what that recipe gives.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxcompress as fxc

MODELS = ("resnet20-hard-digits", "mobilenetv2-hard-digits")


def evaluate(name: str, ratio: float = 0.3, epochs: int = 5, lr: float = 0.02) -> list[dict]:
    from fxcompress.golden_models import GOLDEN

    hard = GOLDEN[name].hard
    model, example = fxc.golden.load(name)
    train, labels = fxc.golden.digits("train", hard=hard)
    images, test_labels = fxc.golden.digits("test", hard=hard)

    def accuracy(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return 100.0 * float((m(images).argmax(1) == test_labels).float().mean())

    batches = [(train[i:i + 64], labels[i:i + 64]) for i in range(0, len(train), 64)]
    calib = [train[i:i + 64] for i in range(0, 512, 64)]
    prune = [{"pass": "prune", "ratio": ratio, "criterion": "l1"}]
    stages = {"pruned": prune, "+ recalibrate_bn": prune + [{"pass": "recalibrate_bn"}],
              f"+ finetune ({epochs} epochs)": prune + [{"pass": "recalibrate_bn"},
                                                         {"pass": "finetune", "epochs": epochs, "lr": lr}]}
    rows = [{"model": name, "stage": "fp32", "accuracy": accuracy(model), "macs": None, "seconds": 0.0}]
    for stage, recipe in stages.items():
        start = time.perf_counter()
        result = fxc.compile(model, example, recipe, calibration_data=calib, train_data=batches)
        rows.append({"model": name, "stage": stage, "accuracy": accuracy(result.module),
                     "macs": result.after.macs / result.before.macs, "seconds": time.perf_counter() - start})
    return rows


def format_table(rows: list[dict]) -> str:
    body = [[r["model"], r["stage"], "" if r["macs"] is None else f"{r['macs']:.2f}", f"{r['accuracy']:.2f}",
             f"{r['seconds']:.1f}"] for r in rows]
    return tabulate(body, headers=["model", "stage", "MACs / fp32", "test accuracy %", "compile s"],
                    tablefmt="github")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        choices=[n for n in fxc.golden.names() if n.endswith("-digits")])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    for name in args.models:
        print(f"{name} ...", file=sys.stderr)
        rows += evaluate(name, args.ratio, args.epochs)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
