"""The data passed between passes: the graph, inputs, cached analyses, plans and the history."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.fx

from .errors import PassError
from .snapshot import RestorePoint
from .tree import named_tensors


@dataclasses.dataclass
class PassRecord:
    """What one pass did: the contract's history entry, plus what the instruments saw."""

    index: int
    name: str
    seconds: float
    modified: bool
    stats: dict[str, Any]
    notes: tuple[str, ...] = ()
    contract: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    diff: str = ""  # unified diff of gm.code; empty when the graph did not change
    param_changes: tuple[str, ...] = ()  # "name: [a, b] -> [c, d]", "+name [..]", "-name [..]"
    error: float | None = None  # max |after - before| / max|before| of the numeric check, if run
    check_seconds: float = 0.0  # time the instruments spent around this pass
    dump_path: str | None = None

    def summary(self) -> str:
        stats = ", ".join(f"{k}={v}" for k, v in self.stats.items())
        err = f", error {self.error:.2e}" if self.error is not None else ""
        return (f"[{self.index:02d} {self.name}] {self.seconds * 1e3:.1f} ms, "
                f"{'modified' if self.modified else 'unchanged'}{err}; {stats}")


@dataclasses.dataclass
class CompileContext:
    """Everything a pass may read or write.  No globals: all state a pass shares lives here.

    ``analyses`` are cached results keyed by name, dropped when a pass modifies the graph (unless the pass lists
    them in ``preserves``); ``plans`` are decisions made by planners for later passes to apply (they survive).
    """

    gm: torch.fx.GraphModule
    example_inputs: tuple
    calibration_data: Iterable | None = None
    train_data: Iterable | None = None  # (inputs, target) batches for the training passes
    eval_fn: Callable[[torch.nn.Module], float] | None = None  # higher is better (accuracy); optional
    model: torch.nn.Module | None = None  # the user's model, read only (the default teacher of distill)
    analyses: dict[str, Any] = dataclasses.field(default_factory=dict)
    plans: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[PassRecord] = dataclasses.field(default_factory=list)
    cursor: int = 0  # index of the next pass of the pipeline to run
    stage_outputs: Any = None  # outputs of gm on example_inputs as it stands, for numeric checks (None: unknown)
    restore_point: RestorePoint | None = None  # while a pass runs: the module as it received it
    _tensors: list[tuple[str, torch.Tensor]] | None = dataclasses.field(default=None, repr=False)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``tree.named_tensors(gm)``, computed once until ``forget_tensors`` (the manager calls it whenever a pass
        may have changed the module)."""
        if self._tensors is None:
            self._tensors = named_tensors(self.gm)
        return self._tensors

    def forget_tensors(self) -> None:
        self._tensors = None

    def analysis(self, name: str, compute: Callable[[CompileContext], Any]) -> Any:
        """The cached analysis ``name``, computed by ``compute(ctx)`` if absent or invalidated."""
        if name not in self.analyses:
            self.analyses[name] = compute(self)
        return self.analyses[name]

    def invalidate(self, keep: Iterable[str] = ()) -> None:
        keep = set(keep)
        for name in list(self.analyses):
            if name not in keep:
                del self.analyses[name]

    def require(self, pass_name: str, needed: Iterable[str]) -> None:
        missing = [n for n in needed if n not in self.analyses and n not in self.plans]
        if missing:
            raise PassError(
                f"[{pass_name}] needs {', '.join(map(repr, missing))}, which no earlier pass produced. "
                f"Run the pass that produces it first (see `fxcompress passes`)."
            )
