"""Accuracy recovered by the training passes on the hard digits: pruning recovery stage by stage, and QAT vs PTQ.

    python -m fxcompress.bench.training [--section recovery|qat|all] [--models NAME ...] [--json OUT.json]

Recovery (per model, about half the MACs pruned): test accuracy of fp32; of the model pruned with ``prune`` (L1,
``ratio`` of every group's channels, remove mode); after ``recalibrate_bn`` (BN statistics re-estimated on 512
training images); after ``finetune`` for N epochs; and after ``distill`` (offline KD from the unpruned model,
T=4, alpha=0.9) for the same N epochs instead of fine-tuning.  Training reads ``fxc.golden.DigitsTraining``: the
training split freshly hardened every epoch, as the models were trained.  One compile per stage.

QAT: ``fold_bn -> insert_observers (kl_tolerance) -> calibrate -> lower_quantized`` (PTQ) against the same recipe
with ``qat`` before lowering, at W4A8 and W8A8 (per-channel weights, uint8 activations after ReLU).  QAT keeps the
weights that score best on the validation split (``eval_fn`` with ``patience``), its starting point (epoch 0) included;
the table reports test accuracy.
Everything is seeded; a rerun on the same machine reproduces the table.
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
from fxcompress.bench.measure import cpu_model
from fxcompress.golden_models import GOLDEN

# model -> (prune ratio giving about half the MACs, epochs, optimizer, lr, weight decay), close to how it was trained
RECOVERY = {
    "resnet20-hard-digits": (0.3, 15, "sgd", 0.02, 5e-4),
    "mobilenetv2-hard-digits": (0.32, 40, "adamw", 3e-3, 0.01),
}
QAT_MODELS = ("resnet20-hard-digits", "mobilenetv2-hard-digits", "vgg-small-hard-digits")
QAT_EPOCHS = 3


def _data(name: str):

    hard = GOLDEN[name].hard
    model, example = fxc.golden.load(name)
    train, _ = fxc.golden.digits("train", hard=hard)
    calib = [train[i:i + 64] for i in range(0, 512, 64)]
    return model, example, calib, fxc.golden.accuracy(name), hard


def recovery(name: str) -> list[dict]:
    ratio, epochs, optimizer, lr, wd = RECOVERY[name]
    model, example, calib, accuracy, hard = _data(name)
    training = {"epochs": epochs, "lr": lr, "optimizer": optimizer, "weight_decay": wd}
    prune = [{"pass": "prune", "ratio": ratio, "criterion": "l1"}]
    recal = prune + [{"pass": "recalibrate_bn"}]
    stages = {"pruned": prune, "+ recalibrate_bn": recal,
              f"+ finetune {epochs} epochs": recal + [{"pass": "finetune"} | training],
              f"+ distill {epochs} epochs": recal + [{"pass": "distill"} | training]}
    fp32 = accuracy(model)
    rows = [{"model": name, "stage": "fp32", "accuracy": fp32, "macs": None, "seconds": 0.0}]
    for stage, recipe in stages.items():
        print(f"  {stage}", file=sys.stderr)
        start = time.perf_counter()
        result = fxc.compile(model, example, recipe, calibration_data=calib,
                             train_data=fxc.golden.DigitsTraining(hard=hard))
        rows.append({"model": name, "stage": stage, "accuracy": accuracy(result.module),
                     "macs": result.after.macs / result.before.macs, "seconds": time.perf_counter() - start})
    for r in rows:
        r["vs_fp32"] = r["accuracy"] - fp32
    return rows


def qat(name: str, bits: int) -> dict:
    model, example, calib, accuracy, hard = _data(name)
    base = [{"pass": "fold_bn"},
            {"pass": "insert_observers", "activation_observer": "kl_tolerance", "weight_bits": bits},
            {"pass": "calibrate"}]
    lower = [{"pass": "lower_quantized"}]
    start = time.perf_counter()
    ptq = fxc.compile(model, example, base + lower, calibration_data=calib)
    ptq_seconds = time.perf_counter() - start
    start = time.perf_counter()
    val = fxc.golden.accuracy(name, "val")  # model selection, not the test split
    step = {"pass": "qat", "epochs": QAT_EPOCHS, "patience": QAT_EPOCHS}
    trained = fxc.compile(model, example, base + [step] + lower, calibration_data=calib,
                          train_data=fxc.golden.DigitsTraining(hard=hard), eval_fn=val)
    best_epoch = trained.history[3].stats["best_epoch"]
    return {"model": name, "bits": f"W{bits}A8", "fp32": accuracy(model), "ptq": accuracy(ptq.module),
            "qat": accuracy(trained.module), "best_epoch": best_epoch, "ptq_seconds": ptq_seconds,
            "qat_seconds": time.perf_counter() - start}


def format_recovery(rows: list[dict]) -> str:
    body = [[r["model"], r["stage"], "" if r["macs"] is None else f"{r['macs']:.3f}", f"{r['accuracy']:.2f}",
             f"{r['vs_fp32']:+.2f}", f"{r['seconds']:.0f}"] for r in rows]
    return tabulate(body, headers=["model", "stage", "MACs / fp32", "test accuracy %", "vs fp32", "compile s"],
                    tablefmt="github")


def format_qat(rows: list[dict]) -> str:
    body = [[r["model"], r["bits"], f"{r['fp32']:.2f}", f"{r['ptq']:.2f}", f"{r['qat']:.2f}",
             f"{r['qat'] - r['ptq']:+.2f}", r["best_epoch"], f"{r['qat_seconds']:.0f}"] for r in rows]
    return tabulate(body, headers=["model", "bits", "fp32 %", "PTQ %", f"QAT ({QAT_EPOCHS} epochs) %", "QAT - PTQ",
                                   "epoch kept", "QAT compile s"], tablefmt="github")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("recovery", "qat", "all"), default="all")
    parser.add_argument("--models", nargs="+", help="restrict to these models")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keep = (lambda n: n in args.models) if args.models else (lambda n: True)
    out: dict[str, list[dict]] = {}
    print(f"CPU: {cpu_model()}")
    if args.section in ("recovery", "all"):
        out["recovery"] = []
        for name in filter(keep, RECOVERY):
            print(f"{name} ...", file=sys.stderr)
            out["recovery"] += recovery(name)
        print(format_recovery(out["recovery"]) + "\n")
    if args.section in ("qat", "all"):
        out["qat"] = []
        for name in filter(keep, QAT_MODELS):
            for bits in (4, 8):
                print(f"{name} W{bits}A8 ...", file=sys.stderr)
                out["qat"].append(qat(name, bits))
        print(format_qat(out["qat"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
