"""The ``fxcompress`` command: ``passes``, ``compress``, ``inspect``.

MODEL is a golden model's name (``fxcompress inspect resnet18``) or ``package.module:factory``, where the factory
returns a module or ``(module, example_inputs)``; with a bare module, give ``--input-shape 1,3,224,224``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

import torch
from tabulate import tabulate

from . import counting, golden
from .api import compile as compile_model
from .errors import FxCompressError, InputError
from .export.ort import max_abs_diff
from .pass_manager import PassManager
from .report import node_table


def load_model(spec: str, input_shape: str | None) -> tuple[torch.nn.Module, tuple]:
    if ":" not in spec:
        return golden.load(spec)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load {spec!r}: {exc}. MODEL is a golden model name ({', '.join(golden.names())}) "
                         f"or package.module:factory.") from exc
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        return made
    if not isinstance(made, torch.nn.Module):
        raise InputError(f"{spec} returned {type(made).__name__}; a factory returns a module or (module, inputs).")
    if input_shape is None:
        raise InputError(f"{spec} returns a bare module; give the example input shape, e.g. --input-shape 1,3,224,224.")
    try:
        shape = tuple(int(d) for d in input_shape.split(","))
    except ValueError as exc:
        raise InputError(f"--input-shape must be comma-separated integers, got {input_shape!r}.") from exc
    return made.eval(), (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)


def cmd_passes(args: argparse.Namespace) -> None:
    from fxcompress.passes import PASSES, SHORTHANDS

    rows = [[name, cls.contract.value, ", ".join(cls.option_names()) or "-", cls.doc()] for name, cls in PASSES.items()]
    rows += [[name, "shorthand", "", (fn.__doc__ or "").strip().splitlines()[0]] for name, fn in SHORTHANDS.items()]
    print(tabulate(rows, headers=["pass", "contract", "options", "what it does"], tablefmt="simple"))


def cmd_inspect(args: argparse.Namespace) -> None:
    model, inputs = load_model(args.model, args.input_shape)
    pm = PassManager(args.recipe or [])
    ctx = pm.context(model, inputs, eval_mode=True)
    pm.run(ctx)
    print(node_table(counting.node_costs(ctx.gm), counting.totals(ctx.gm)))


def cmd_compress(args: argparse.Namespace) -> None:
    model, inputs = load_model(args.model, args.input_shape)
    if args.step:
        pm = PassManager(args.recipe, dump_dir=args.dump_dir)
        ctx = pm.context(model, inputs, eval_mode=True)
        while pm.pending(ctx):
            record = pm.step(ctx)
            print(record.summary())
            print(record.diff or "(graph unchanged)")
            for change in record.param_changes:
                print(f"  {change}")
        return
    result = compile_model(model, inputs, args.recipe, dump_dir=args.dump_dir)
    print(result.report())
    if args.export:
        path = result.export_onnx(args.export)
        check = tuple(torch.randn((2, *t.shape[1:]), generator=torch.Generator().manual_seed(1)) for t in inputs)
        print(f"\nwrote {path}; ONNX Runtime vs PyTorch at batch 2: max abs diff {max_abs_diff(result.module, path, check):.2e}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxcompress", description="A model-compression compiler on torch.fx.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list the passes: name, contract, options, one-line doc").set_defaults(fn=cmd_passes)
    for name, fn, help_text in (("compress", cmd_compress, "compile MODEL through a recipe"),
                                ("inspect", cmd_inspect, "per-node params, MACs and bytes of MODEL")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", metavar="MODEL", help="golden model name or package.module:factory")
        p.add_argument("--recipe", required=name == "compress", help="TOML recipe ([[passes]] tables)")
        p.add_argument("--input-shape", help="example input shape when the factory returns a bare module")
        p.set_defaults(fn=fn)
        if name == "compress":
            p.add_argument("--export", metavar="OUT.onnx", help="write the result as ONNX and check it in ORT")
            p.add_argument("--dump-dir", help="write numbered code dumps and diffs of each pass here")
            p.add_argument("--step", action="store_true", help="run one pass at a time, printing each diff")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except FxCompressError as exc:
        print(f"fxcompress: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
