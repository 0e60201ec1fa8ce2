"""Hugging Face transformers in INT8: fxcompress's dynamic and static quantization against ONNX Runtime's
``quantize_dynamic`` of the same fp32 export, in ORT at batch 1 and one thread.

    python -m fxcompress.bench.hf_int8 [--models bert distilbert roberta albert gpt2 opt llama t5-encoder vit]
                                       [--layers 4] [--runs 30] [--sessions 3] [--error-seeds 3]

Each model is a Hugging Face architecture at its base width (768 hidden, 12 heads, 3072 FFN) with ``--layers``
layers and random weights (no downloads); text models take 128 tokens, ViT a 224x224 image.  For each: the fp32
export of the traced model, ORT's ``quantize_dynamic`` (QInt8 weights, its defaults) of that file, and the exports of
``quantize`` with ``mode="dynamic"`` (weights per channel, and per tensor as ORT's are) and static (calibrated on 8
random inputs of the same kind): milliseconds (each file in ``--sessions`` sessions, every session's median of
alternated runs, the median of those) and the ratio to ORT's file per session, the largest absolute error and the
SQNR of the last hidden state against PyTorch fp32, and the file size.  The errors of ours dynamic and ORT's are
compared again on models built from ``--error-seeds`` other seeds.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

import fxcompress as fxc

from ..export.onnx import export_onnx
from ..export.ort import session
from .measure import alternated_latency, cpu_model, sqnr_db

VARIANTS = {"ours dynamic": {"mode": "dynamic"}, "ours dynamic per-tensor": {"mode": "dynamic", "per_channel": False},
            "ours static": {}}
MODELS = ("bert", "distilbert", "roberta", "albert", "gpt2", "opt", "llama", "t5-encoder", "vit")


def build(name: str, layers: int, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list]:
    """(model, example inputs by name, calibration batches) of a base-width architecture with random weights."""
    import transformers as t
    torch.manual_seed(seed)
    base = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=layers)
    configs = {
        "bert": lambda: t.BertModel(t.BertConfig(vocab_size=30522, **base)),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(n_layers=layers)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(n_layer=layers, use_cache=False)),
        "roberta": lambda: t.RobertaModel(t.RobertaConfig(vocab_size=30522, **base)),
        "albert": lambda: t.AlbertModel(t.AlbertConfig(vocab_size=30000, embedding_size=128, **base)),
        "opt": lambda: t.OPTModel(t.OPTConfig(hidden_size=768, num_attention_heads=12, ffn_dim=3072,
                                              num_hidden_layers=layers, word_embed_proj_dim=768, use_cache=False)),
        "llama": lambda: t.LlamaModel(t.LlamaConfig(vocab_size=32000, use_cache=False, **base)),
        "t5-encoder": lambda: t.T5EncoderModel(t.T5Config(d_model=768, d_ff=3072, d_kv=64, num_heads=12,
                                                          num_layers=layers, use_cache=False)),
        "vit": lambda: t.ViTModel(t.ViTConfig(**base)),
    }
    model = configs[name]().eval()
    g = torch.Generator().manual_seed(seed + 1)

    def sample():
        if name == "vit":
            return {"pixel_values": torch.randn(1, 3, 224, 224, generator=g)}
        return {"input_ids": torch.randint(0, 1000, (1, 128), generator=g),
                "attention_mask": torch.ones(1, 128, dtype=torch.long)}
    inputs = sample()
    calibration = [tuple(sample().values()) for _ in range(8)]
    return model, inputs, calibration


def exports(name: str, layers: int, work: Path, seed: int = 0,
            variants: tuple[str, ...] = tuple(VARIANTS)) -> tuple[dict[str, Path], dict, np.ndarray]:
    """({variant: ONNX file}, example inputs, PyTorch fp32 last hidden state) of one model built from ``seed``: the
    fp32 export, ORT's ``quantize_dynamic`` of it and ours of ``variants``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    model, inputs, calibration = build(name, layers, seed)
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state.numpy()
    files = {"fp32": export_onnx(fxc.trace(model, inputs), tuple(inputs.values()), work / f"{name}_fp32.onnx")}
    files["ORT quantize_dynamic"] = work / f"{name}_ort_dynamic.onnx"
    quantize_dynamic(str(files["fp32"]), str(files["ORT quantize_dynamic"]), weight_type=QuantType.QInt8)
    for label in variants:
        result = fxc.compile(model, inputs, [{"pass": "quantize", **VARIANTS[label]}], calibration_data=calibration)
        files[label] = result.export_onnx(work / f"{name}_{label.replace(' ', '_')}.onnx")
    return files, inputs, reference


def _errors(out: np.ndarray, reference: np.ndarray) -> dict:
    return {"sqnr_db": sqnr_db(reference, out), "max_abs_err": float(np.abs(out - reference).max())}


def measure(name: str, layers: int, runs: int, work: Path, sessions: int = 3) -> list[dict]:
    """One row per variant: latency (the median over sessions of each session's median), its ratio to ORT's
    ``quantize_dynamic`` in every session, errors and file size."""
    files, inputs, reference = exports(name, layers, work)
    labels = list(files)
    copies = {}  # the same file in several sessions, made in rotating order: where ORT's buffers land moves one
    for i in range(sessions):  # session's latency by several percent (T5: either variant ahead, by file order)
        for k in labels[i % len(labels):] + labels[:i % len(labels)]:
            copies[k, i] = session(files[k])
    feed = {k: v.numpy() for k, v in inputs.items()}
    each = alternated_latency({key: (lambda s=s: s.run(None, feed)) for key, s in copies.items()}, runs)
    rows = []
    for k in labels:
        ratios = sorted(each[k, i] / each["ORT quantize_dynamic", i] for i in range(sessions))
        rows.append({"model": name, "variant": k, "ms": statistics.median(each[k, i] for i in range(sessions)) * 1e3,
                     "vs_ort": ratios, **_errors(copies[k, 0].run(None, feed)[0], reference),
                     "mb": files[k].stat().st_size / 1e6})
    return rows


def error_seeds(name: str, layers: int, seeds: int, work: Path) -> list[dict]:
    """Ours dynamic (per channel and per tensor) against ORT's ``quantize_dynamic`` on models built from seeds
    1..``seeds``: the SQNR gained and the ratio of the largest errors, per seed."""
    ours = ("ours dynamic", "ours dynamic per-tensor")
    rows = {k: {"model": name, "variant": k, "sqnr_gained_db": [], "max_err_ratio": []} for k in ours}
    for seed in range(1, seeds + 1):
        files, inputs, reference = exports(name, layers, work, seed, ours)
        feed = {k: v.numpy() for k, v in inputs.items()}
        theirs = _errors(session(files["ORT quantize_dynamic"]).run(None, feed)[0], reference)
        for k in ours:
            got = _errors(session(files[k]).run(None, feed)[0], reference)
            rows[k]["sqnr_gained_db"].append(got["sqnr_db"] - theirs["sqnr_db"])
            rows[k]["max_err_ratio"].append(got["max_abs_err"] / theirs["max_abs_err"])
    return list(rows.values())


def _model(name: str, args: argparse.Namespace, work: Path) -> tuple[list[dict], list[dict]]:
    torch.set_num_threads(1)
    rows = measure(name, args.layers, args.runs, work, args.sessions)
    return rows, error_seeds(name, args.layers, args.error_seeds, work) if args.error_seeds else []


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m fxcompress.bench.hf_int8", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--sessions", type=int, default=3, help="sessions per variant (the median of their medians)")
    parser.add_argument("--error-seeds", type=int, default=3,
                        help="models from this many more seeds compare the errors of ours dynamic and ORT's")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, seeds = [], []
    # A fresh process per model: ORT's arenas and the compiled models of 4 files x (1 + seeds) builds do not go back
    # to the system, and nine base-width models in one process outgrow 24 GB.
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ProcessPoolExecutor(
            1, multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        for name in args.models:
            measured, compared = pool.submit(_model, name, args, Path(tmp)).result()
            rows.extend(measured)
            seeds.extend(compared)
    print(f"CPU: {cpu_model()}; batch 1, 1 thread, {args.layers} layers, medians of {args.runs} alternated runs "
          f"in each of {args.sessions} sessions per variant, the median of those; 'x ORT' is the ratio to ORT's "
          f"quantize_dynamic in the sessions' median [lowest, highest]")
    print(tabulate([[r["model"], r["variant"], f"{r['ms']:.2f}", _span(r["vs_ort"], "{:.3f}"),
                     f"{r['max_abs_err']:.4f}", f"{r['sqnr_db']:.1f}", f"{r['mb']:.1f}"] for r in rows],
                   headers=["model", "variant", "ms", "x ORT", "max abs err", "SQNR dB", "MB"], tablefmt="github"))
    if seeds:
        print(f"\nOurs dynamic against ORT's quantize_dynamic on models from seeds 1-{args.error_seeds} (median "
              f"[lowest, highest]):")
        print(tabulate([[r["model"], r["variant"], _span(r["sqnr_gained_db"], "{:+.2f}"),
                         _span(r["max_err_ratio"], "{:.3f}")] for r in seeds],
                       headers=["model", "variant", "SQNR gained dB", "max abs err ours / ORT's"], tablefmt="github"))
    return rows + seeds


def _span(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


if __name__ == "__main__":
    main()
