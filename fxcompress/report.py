"""Human-readable tables: the compile report and the per-node listing of ``fxcompress inspect``."""
from __future__ import annotations

from typing import Iterable, Sequence

from tabulate import tabulate

from .context import PassRecord
from .counting import NodeCost, Totals


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {suffix}{unit}".rstrip()
    return f"{n:g} {unit}".rstrip()


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}" if before else "-"


def _stats(stats: dict) -> str:
    """Scalar stats in full; dict-valued ones (per-layer ratios) as their size, to keep the table readable."""
    def show(v) -> str:
        return f"<{len(v)} entries>" if isinstance(v, dict) else str(v)
    return ", ".join(f"{k}={show(v)}" for k, v in stats.items() if v not in (0, None, [], {}, ()))


def compile_report(model_name: str, before: Totals, after: Totals, history: Sequence[PassRecord],
                   trace_line: str) -> str:
    summary = tabulate(
        [
            ["params", human(before.params), human(after.params), _ratio(after.params, before.params)],
            ["MACs", human(before.macs), human(after.macs), _ratio(after.macs, before.macs)],
            ["weights (bytes)", human(before.weight_bytes, "B"), human(after.weight_bytes, "B"),
             _ratio(after.weight_bytes, before.weight_bytes)],
            ["graph nodes", before.nodes, after.nodes, _ratio(after.nodes, before.nodes)],
        ],
        headers=["", "before", "after", "after/before"], tablefmt="simple",
    )
    passes = tabulate(
        [[r.index, r.name, r.contract, f"{r.seconds * 1e3:.1f}", f"{r.check_seconds * 1e3:.1f}",
          "yes" if r.modified else "no", "-" if r.error is None else f"{r.error:.1e}", _stats(r.stats)]
         for r in history],
        headers=["#", "pass", "contract", "ms", "checks ms", "modified", "rel. error", "stats"], tablefmt="simple",
    )
    notes = [f"  [{r.name}] {n}" for r in history for n in r.notes]
    parts = [f"{model_name}: {trace_line}", summary, "", passes]
    if notes:
        parts += ["", "notes:", *notes]
    return "\n".join(parts)


def node_table(rows: Iterable[NodeCost], totals: Totals) -> str:
    body = [[r.node, r.op, r.target, r.shape, r.params or "", human(r.macs) if r.macs else "",
             human(r.out_bytes, "B") if r.out_bytes else ""] for r in rows]
    body.append(["total", "", "", "", totals.params, human(totals.macs), ""])
    return tabulate(body, headers=["node", "op", "target", "output", "params", "MACs", "output bytes"],
                    tablefmt="simple")
