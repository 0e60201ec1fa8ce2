"""Train the digits golden models from their seeds and write their weights and fp32 accuracies.

    python -m fxcompress.golden_models.train                  # every digits model
    python -m fxcompress.golden_models.train resnet20-digits  # one
    python -m fxcompress.golden_models.train --record         # write expected.json from the checked-in weights

``expected.json`` holds, per trained model, the fp32 accuracy of the checked-in weights on each split and the
accuracy on the test split of ONNX Runtime's ``quantize_static`` INT8 baseline (QDQ, per-channel, U8S8, MinMax, 128
calibration samples from the train split); the golden tests check both.

Deterministic on CPU for a given seed and thread count (2, as on every machine here); a rerun reproduces the
checked-in accuracy within a point.  Clean models train on the clean split with random shifts of up to 2 pixels;
hard models train on freshly hardened images every epoch (the hard transform with another seed).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.bench.runner import ort_int8_accuracy
from fxcompress.golden import load

from . import DIGITS_TRAINING, EXPECTED, GOLDEN, WEIGHTS, build_architecture
from .digits import SEED, digits, harden, raw_split, standardize


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = sum(int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
                  for i in range(0, len(labels), batch))
    return 100.0 * correct / len(labels)


def _shift(x: torch.Tensor, g: torch.Generator, pixels: int = 2) -> torch.Tensor:
    padded = F.pad(x, (pixels,) * 4)
    dx, dy = (int(v) for v in torch.randint(0, 2 * pixels + 1, (2,), generator=g))
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train(name: str, log=print) -> dict[str, float]:
    spec, recipe = GOLDEN[name], DIGITS_TRAINING[name]
    torch.manual_seed(spec.seed)
    model = build_architecture(name)
    raw, labels = raw_split("train")
    g = torch.Generator().manual_seed(spec.seed)
    params_decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    params_other = [p for n, p in model.named_parameters() if p.dim() <= 1]
    groups = [{"params": params_decay, "weight_decay": recipe["wd"]}, {"params": params_other, "weight_decay": 0.0}]
    if recipe["opt"] == "sgd":
        opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=recipe["lr"])
    epochs, batch = recipe["epochs"], 64
    steps = epochs * math.ceil(len(labels) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps, pct_start=0.15)
    hard = spec.hard
    for epoch in range(epochs):
        images = standardize(harden(raw, SEED + 1000 * (epoch + 1)) if hard else raw)
        order = torch.randperm(len(labels), generator=g)
        model.train()
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            x = images[idx] if hard else _shift(images[idx], g)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 5 == 4 or epoch == epochs - 1:
            val = accuracy(model, *digits("val", hard))
            log(f"{name} epoch {epoch + 1}/{epochs} loss {total / len(labels):.4f} val {val:.2f}%")
    model.eval()
    WEIGHTS.mkdir(exist_ok=True)
    torch.save(model.state_dict(), WEIGHTS / f"{name}.pt")
    return {split: accuracy(model, *digits(split, hard)) for split in ("train", "val", "test")}


def record(names: list[str]) -> dict:
    """Accuracies of the checked-in weights (fp32 per split, ORT INT8 MinMax on test), written to expected.json."""

    expected = json.loads(EXPECTED.read_text()) if EXPECTED.exists() else {}
    for name in names:
        model, _ = load(name)
        hard = GOLDEN[name].hard
        expected[name] = {
            "fp32_accuracy": {split: accuracy(model, *digits(split, hard)) for split in ("train", "val", "test")},
            "ort_int8_minmax_test_accuracy": ort_int8_accuracy(name, "MinMax", 128)["accuracy"],
        }
        print(name, expected[name])
    EXPECTED.write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    return expected


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=sorted(DIGITS_TRAINING))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="only write expected.json from the checked-in weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.record:
        record(args.names)
        return
    for name in args.names:
        start = time.perf_counter()
        acc = train(name)
        print(f"{name}: {acc} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
