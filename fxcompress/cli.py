"""The ``fxcompress`` command: ``passes``, ``compress``, ``inspect``, ``groups``, ``bench``.

MODEL is a golden model's name (``fxcompress inspect resnet18``) or ``package.module:factory``, where the factory
returns a module or ``(module, example_inputs)``; with a bare module, give ``--input-shape 1,3,224,224``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from tabulate import tabulate

from fxcompress.passes import PASSES, SHORTHANDS
from fxcompress.passes.pruning.lib import latency, latency_model, width_search
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.lib.plan_quality import PlanQuality
from fxcompress.passes.pruning.lib.width_space import WidthSpace, candidate_groups
from fxcompress.passes.pruning.select_channels import CRITERIA, DATA_CRITERIA, SCORERS

from . import counting, data, persist
from .api import compile as compile_model
from .bench import DEFAULT_RECIPES, BenchConfig, format_table, run_bench
from .bench.measure import cpu_model
from .errors import FxCompressError, InputError
from .export import export_onnx
from .export.ort import max_abs_diff
from .golden import accuracy as golden_accuracy
from .golden import calibration_batches, load_model, training_data
from .pass_manager import PassManager
from .report import node_table
from .tracing import trace


def cmd_passes(args: argparse.Namespace) -> None:

    rows = [[name, cls.contract.value, ", ".join(cls.option_names()) or "-", cls.doc()] for name, cls in PASSES.items()]
    rows += [[name, "shorthand", "", (fn.__doc__ or "").strip().splitlines()[0]] for name, fn in SHORTHANDS.items()]
    print(tabulate(rows, headers=["pass", "contract", "options", "what it does"], tablefmt="simple"))


def cmd_inspect(args: argparse.Namespace) -> None:
    model, inputs = load_model(args.model, args.input_shape)
    pm = PassManager(args.recipe or [])
    ctx = pm.context(model, inputs, eval_mode=True)
    pm.run(ctx)
    print(node_table(counting.node_costs(ctx.gm), counting.totals(ctx.gm)))


def cmd_groups(args: argparse.Namespace) -> None:
    """The channel groups of MODEL: what would be pruned together, and what is left whole and why."""

    model, inputs = load_model(args.model, args.input_shape)
    pm = PassManager(args.recipe or [])
    ctx = pm.context(model, inputs, eval_mode=True)
    pm.run(ctx)
    cg = ChannelGraph(ctx.gm, args.attention)
    rows = [[g.name, g.size, g.n_prunable, len(g.members),
             "inexact: " + g.inexact[0] if g.inexact else "", g.fixed[0] if g.fixed else ""] for g in cg.groups]
    print(tabulate(rows, headers=["group", "channels", "prunable", "members", "exactness", "fixed because"],
                   tablefmt="simple"))
    for node, why in cg.rel.barriers.items():
        print(f"barrier {node}: {why}")


def _user_data(args: argparse.Namespace, inputs: tuple) -> tuple:
    """(calibration data, training data, eval_fn) from the command line, else a trained golden model's own; random
    calibration inputs as the last resort, announced when a pass reads them."""
    if args.calibration_data:
        calibration = data.input_batches(args.calibration_data, inputs, args.batch_size, "--calibration-data")
    else:
        calibration = calibration_batches(args.model) or data.RandomCalibration(
            inputs, 128, lambda message: print(f"fxcompress: warning: {message}", file=sys.stderr))
    train = data.training_batches(args.train_data, inputs, args.batch_size, "--train-data") if args.train_data \
        else training_data(args.model)
    eval_fn = data.eval_function(args.eval_fn, inputs, args.batch_size) if args.eval_fn else None
    return calibration, train, eval_fn


def _export(module: torch.nn.Module, inputs: tuple, path: str) -> None:
    written = export_onnx(module, inputs, path)
    check = tuple(torch.randn((2, *t.shape[1:]), generator=torch.Generator().manual_seed(1), dtype=t.dtype)
                  if t.is_floating_point() else t for t in inputs)
    print(f"\nwrote {written}; ONNX Runtime vs PyTorch at batch 2: max abs diff "
          f"{max_abs_diff(module, written, check):.2e}")


def cmd_compress(args: argparse.Namespace) -> None:
    model, inputs = load_model(args.model, args.input_shape)
    calibration, train, eval_fn = _user_data(args, inputs)
    if args.step:
        pm = PassManager(args.recipe, dump_dir=args.dump_dir)
        ctx = pm.context(model, inputs, calibration, eval_mode=True, train_data=train, eval_fn=eval_fn)
        while pm.pending(ctx):
            record = pm.step(ctx)
            print(record.summary())
            print(record.diff or "(graph unchanged)")
            for change in record.param_changes:
                print(f"  {change}")
        module = ctx.gm.eval()
    else:
        result = compile_model(model, inputs, args.recipe, calibration, dump_dir=args.dump_dir, train_data=train,
                               eval_fn=eval_fn)
        print(result.report())
        module = result.module
    score, what, unit = (eval_fn, "eval_fn", "") if eval_fn is not None else \
        (golden_accuracy(args.model), "test accuracy", " %")
    if score is not None:
        model.eval()
        with torch.no_grad():
            print(f"\n{what}: {score(model):.2f}{unit} before, {score(module):.2f}{unit} after")
    if args.save:
        print(f"\nsaved {persist.save(module, args.save)} (load it with fxc.load)")
    if args.export:
        _export(module, inputs, args.export)


def cmd_bench(args: argparse.Namespace) -> None:
    """fxcompress against ONNX Runtime's own INT8 quantizer on MODEL."""
    config = BenchConfig.quick() if args.quick else BenchConfig()
    if args.runs:
        config = dataclasses.replace(config, runs=args.runs)
    with tempfile.TemporaryDirectory(prefix="fxcompress-recipe-") as tmp:
        recipes = args.recipe
        if not recipes:  # the default fxcompress rows (bench.DEFAULT_RECIPES)
            recipes = []
            for name, text in DEFAULT_RECIPES.items():
                (Path(tmp) / f"{name}.toml").write_text(text)
                recipes.append(str(Path(tmp) / f"{name}.toml"))
        report = run_bench(args.model, recipes, config, log=lambda m: print(m, file=sys.stderr))
    print(f"CPU: {cpu_model()}")
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def cmd_latency(args: argparse.Namespace) -> None:
    """The measured latency of MODEL's Conv/Linear layers in a runtime, where their cost rises, and the whole
    model's predicted latency against measured runs."""
    model, inputs = load_model(args.model, args.input_shape)
    if args.batch is not None:
        if args.batch < 1:
            raise InputError(f"--batch must be a positive integer, got {args.batch}.")
        inputs = latency_model.batched(inputs, args.batch)
    gm = trace(model, inputs, eval_mode=True)
    shapes = latency.layer_shapes(gm)
    if not shapes:
        raise InputError(f"{args.model} has no Conv/Linear layer whose latency can be measured.")
    table = latency.build_table(shapes.values(), args.runtime, args.threads, args.points, cache=not args.no_cache,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    rows = []
    for name, shape in shapes.items():
        sweeps = table.sweeps[latency.layer_key(shape)]
        penalty = [latency.misalignment(s) for s in sweeps.values()]
        penalty = [x for x in penalty if x is not None]
        rows.append([name, shape.kind + (" dw" if shape.depthwise else ""), f"{shape.cin}->{shape.cout}",
                     f"{shape.macs / 1e6:.2f}", f"{table.seconds(shape) * 1e6:.1f}",
                     ", ".join(map(str, latency.rises(table.out_sweep(shape)))) or "-",
                     f"{max(penalty):.2f}x" if penalty else "-"])
    print(f"CPU: {table.machine}; runtime {args.runtime}, {args.threads} thread(s), batch {inputs[0].shape[0]}")
    print(tabulate(rows, headers=["layer", "kind", "widths", "MMACs", "us (measured)", "cost rises after width",
                                  f"widths not /{latency.ALIGN}"], tablefmt="simple"))
    print(f"sum of layers: {latency.model_seconds(table, shapes) * 1e3:.3f} ms")
    if args.check:
        _check_prediction(gm, inputs, table, shapes, args)
    if args.json:
        Path(args.json).write_text(json.dumps(table.to_json(), indent=1))


def _check_prediction(gm, inputs, table, shapes, args: argparse.Namespace) -> None:
    """Calibrate the whole-model prediction on measured runs, then predict ``args.check`` random width plans and
    measure them."""
    cg = ChannelGraph(gm)
    groups = candidate_groups(cg)
    if not groups:
        print("no prunable channel group: the prediction has nothing to vary")
        return
    space = WidthSpace(cg, SCORERS["l1"](cg, None, {}), shapes, groups)
    calibration = latency_model.calibration_plans(space)
    checked = latency_model.random_plans(space, args.check, seed=1)
    plans = {**calibration, **checked}
    prepared: dict = {}
    measured = latency_model.measure_plans(gm, inputs, space, plans, args.runtime, args.threads, cache=prepared)
    predictor = latency_model.Predictor(table, space, shapes)
    profiled = latency_model.observe_plans(predictor, gm, inputs, calibration, prepared, args.threads)
    predictor.calibrate([(calibration[k], measured[k]) for k in calibration])
    rows = [[k, f"{space.macs(v):.2f}", f"{measured[k] * 1e3:.3f}", f"{predictor.seconds(v) * 1e3:.3f}",
             f"{(predictor.seconds(v) / measured[k] - 1) * 100:+.1f} %"] for k, v in plans.items()]
    print(f"\nwhole model (calibrated on the first {len(calibration)} plans, {profiled} of {len(shapes)} layers "
          f"profiled inside them: a = {predictor.scale:.3f}, c = {predictor.const * 1e3:.3f} ms, "
          f"v = {predictor.per_volume * 1e3:.3f} ms)")
    print(tabulate(rows, headers=["width plan", "MACs", "measured ms", "predicted ms", "error"], tablefmt="simple"))


def cmd_sensitivity(args: argparse.Namespace) -> None:
    """PaddleSlim's sensitivity analysis: every channel group pruned alone over a ladder of shares, scored by the
    model's accuracy (a trained golden model, or --eval-fn) or else by the SQNR of its outputs on calibration data."""
    model, inputs = load_model(args.model, args.input_shape)
    calibration, _, eval_fn = _user_data(args, inputs)
    eval_fn = eval_fn or golden_accuracy(args.model, "val")
    gm = trace(model, inputs, eval_mode=True)
    cg = ChannelGraph(gm)
    groups = candidate_groups(cg)
    if not groups:
        raise InputError(f"{args.model} has no prunable channel group (see `fxcompress groups {args.model}`).")
    shares = tuple(float(x) for x in args.shares.split(","))
    if not shares or any(not 0 < x < 1 for x in shares):
        raise InputError(f"--shares are fractions of each group's channels, 0 < share < 1; got {args.shares!r}.")
    space = WidthSpace(cg, SCORERS[args.criterion](cg, None, {"seed": 0, "loss": None, "calibration_batches": 8}),
                       latency.layer_shapes(gm), groups)
    quality = PlanQuality(gm, cg, space, calibration, eval_fn)
    problem = width_search.Problem(space, space.macs, 1.0, [], quality, evaluations=len(groups) * len(shares))
    table = width_search.sensitivities(problem, shares)
    what = "eval_fn" if args.eval_fn else ("val accuracy (%)" if eval_fn is not None else "output SQNR (dB)")
    print(f"loss in {what} with each group pruned alone ({args.criterion}), by share of its channels removed:")
    rows = [[name, space.groups[i].size, *(f"{row[x]:.2f}" for x in shares)] for i, (name, row) in
            enumerate(table.items())]
    print(tabulate(rows, headers=["group", "channels", *(f"{x:g}" for x in shares)], tablefmt="simple"))
    if args.json:
        Path(args.json).write_text(json.dumps({"metric": what, "criterion": args.criterion, "shares": list(shares),
                                               "loss": table}, indent=1))
    if args.plot:
        plot_sensitivities(table, what, args.model, args.plot)
        print(f"wrote {args.plot}")


def plot_sensitivities(table: dict[str, dict[float, float]], metric: str, title: str, path: str) -> None:
    """One curve per group: the loss against the share removed."""
    try:
        import matplotlib
    except ImportError as exc:
        raise InputError("--plot needs matplotlib (pip install matplotlib).") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20")
    for i, (name, row) in enumerate(table.items()):
        ax.plot(list(row), list(row.values()), marker="os^D"[i // 20 % 4], markersize=3, label=name,
                color=colors(i % 20), linestyle="-" if i % 2 == 0 else "--")
    ax.set_xlabel("share of the group's channels removed")
    ax.set_ylabel(f"loss in {metric}")
    ax.set_title(f"{title}: sensitivity of each channel group")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxcompress", description="A model-compression compiler on torch.fx.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list the passes: name, contract, options, one-line doc").set_defaults(fn=cmd_passes)
    for name, fn, help_text in (("compress", cmd_compress, "compile MODEL through a recipe"),
                                ("inspect", cmd_inspect, "per-node params, MACs and bytes of MODEL"),
                                ("groups", cmd_groups, "the channel groups pruning would remove together")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", metavar="MODEL", help="golden model name or package.module:factory")
        p.add_argument("--recipe", required=name == "compress", help="TOML recipe ([[passes]] tables)")
        p.add_argument("--input-shape", help="example input shape when the factory returns a bare module")
        p.set_defaults(fn=fn)
        if name == "groups":
            p.add_argument("--attention", default="dims", choices=("dims", "heads", "both"),
                           help="which factor of attention heads x head dims is prunable")
        if name == "compress":
            p.add_argument("--export", metavar="OUT.onnx", help="write the result as ONNX and check it in ORT")
            p.add_argument("--dump-dir", help="write numbered code dumps and diffs of each pass here")
            p.add_argument("--step", action="store_true", help="run one pass at a time, printing each diff")
            p.add_argument("--save", metavar="OUT.pt", help="save the compiled module (load it with fxc.load)")
            p.add_argument("--calibration-data", metavar="SPEC",
                           help="calibration inputs: a .pt/.npy tensor file or package.module:function "
                                "(default: a trained golden model's digits, else random inputs, with a warning)")
            p.add_argument("--train-data", metavar="SPEC",
                           help="training data: a .pt file of (inputs, targets) or package.module:function "
                                "returning (inputs, target) batches")
            p.add_argument("--eval-fn", metavar="SPEC",
                           help="package.module:function(module) -> float, or a .pt file of (inputs, labels) "
                                "scored by top-1 accuracy")
            p.add_argument("--batch-size", type=int, default=16,
                           help="samples per batch when a tensor file is split (default 16)")
    lat = sub.add_parser("latency", help="measured latency of each Conv/Linear layer over its widths, in a runtime")
    lat.add_argument("model", metavar="MODEL", help="golden model name or package.module:factory")
    lat.add_argument("--input-shape", help="example input shape when the factory returns a bare module")
    lat.add_argument("--runtime", default="ort-int8", choices=latency.RUNTIMES)
    lat.add_argument("--batch", type=int, help="batch size (default: the example input's)")
    lat.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    lat.add_argument("--points", type=int, default=16, help="widths measured per sweep (default 16)")
    lat.add_argument("--no-cache", action="store_true", help="measure again instead of reading the cache")
    lat.add_argument("--check", type=int, default=3, metavar="N",
                     help="random width plans whose predicted latency is checked against a measured run "
                          "(default 3; 0: none)")
    lat.add_argument("--json", metavar="OUT.json", help="also write the table as JSON")
    lat.set_defaults(fn=cmd_latency)
    sens = sub.add_parser("sensitivity", help="each channel group pruned alone over a ladder of shares, scored")
    sens.add_argument("model", metavar="MODEL", help="golden model name or package.module:factory")
    sens.add_argument("--input-shape", help="example input shape when the factory returns a bare module")
    sens.add_argument("--criterion", default="l1", choices=[c for c in CRITERIA if c not in DATA_CRITERIA],
                      help="which channels go first (default l1; the data-free criteria)")
    sens.add_argument("--shares", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                      help="shares of each group's channels to remove, comma-separated")
    sens.add_argument("--calibration-data", metavar="SPEC", help="inputs for the SQNR score (as for compress)")
    sens.add_argument("--eval-fn", metavar="SPEC", help="package.module:function(module) -> float, higher is better")
    sens.add_argument("--train-data", metavar="SPEC", help=argparse.SUPPRESS)
    sens.add_argument("--batch-size", type=int, default=16, help="samples per batch when a tensor file is split")
    sens.add_argument("--plot", metavar="OUT.png", help="write the curves, one per group")
    sens.add_argument("--json", metavar="OUT.json", help="write the table as JSON")
    sens.set_defaults(fn=cmd_sensitivity)
    bench = sub.add_parser("bench", help="fxcompress against ONNX Runtime's own INT8 quantizer")
    bench.add_argument("model", metavar="MODEL", help="golden model name or package.module:factory")
    bench.add_argument("--recipe", action="append", help="a TOML recipe to benchmark (repeatable; default: fold_bn, int8 with kl_tolerance and with minmax)")
    bench.add_argument("--quick", action="store_true", help="batch 1, 1 thread, 10 runs, MinMax only: under a minute")
    bench.add_argument("--runs", type=int, help="latency runs per contender (default 30, quick 10)")
    bench.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    bench.set_defaults(fn=cmd_bench)
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
