"""The data passed between passes: the graph, inputs, cached analyses, plans and the history."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.fx

from .errors import PassError
from .plans import Artifact, Store
from .snapshot import RestorePoint
from .tree import named_tensors, own_tensors


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
    piece: str = ""  # the submodule this pass ran on, when the model was compiled piece by piece
    inner: tuple[PassRecord, ...] = ()  # passes run from inside this one (PassManager.run_inner), in order

    def summary(self) -> str:
        stats = ", ".join(f"{k}={v}" for k, v in self.stats.items())
        err = f", error {self.error:.2e}" if self.error is not None else ""
        return (f"[{self.index:02d} {self.name}] {self.seconds * 1e3:.1f} ms, "
                f"{'modified' if self.modified else 'unchanged'}{err}; {stats}")


@dataclasses.dataclass
class RunState:
    """The manager's bookkeeping for one context; passes never read it.  ``cursor`` is the index of the next pass of
    the pipeline, ``stage_outputs`` the outputs of the module as it stands on the example inputs (None: unknown),
    ``restore_point`` (while a pass runs) the module as the pass received it, ``tensors`` the module's tensor table
    for the instruments (None: to be read again)."""

    cursor: int = 0
    index: int = 0  # the pipeline pass running (or last run)
    manager: Any = None  # the PassManager running this context
    inner: list[PassRecord] = dataclasses.field(default_factory=list)  # records of passes run inside the running one
    stage_outputs: Any = None
    restore_point: RestorePoint | None = None
    tensors: list[tuple[str, torch.Tensor]] | None = None


@dataclasses.dataclass
class CompileContext:
    """Everything a pass may read or write.  No globals: all state a pass shares lives here.

    ``analyses`` and ``plans`` are typed stores (``fxcompress.plans``): analyses are dropped when a pass modifies the
    graph (unless the pass lists them in ``preserves``), plans survive.  ``given`` holds the plans passed to
    ``compile(..., plans=...)``, which their planners apply instead of deciding again; ``requested`` the types that
    passes later in the pipeline require (a pass makes an ``ON_REQUEST`` artifact only when it is there).
    ``borrowed`` holds the ids of the model's tensors that ``gm`` still shares: the traced copy borrows them
    (copy on write), and ``own_tensors()`` copies them before a pass writes tensors and when a pipeline ends.
    """

    gm: torch.fx.GraphModule
    example_inputs: tuple
    calibration_data: Iterable | None = None
    train_data: Iterable | None = None  # (inputs, target) batches for the training passes
    eval_fn: Callable[[torch.nn.Module], float] | None = None  # higher is better (accuracy); optional
    model: torch.nn.Module | None = None  # the user's model, read only (the default teacher of distill)
    analyses: Store = dataclasses.field(default_factory=Store)
    plans: Store = dataclasses.field(default_factory=Store)
    given: Store = dataclasses.field(default_factory=Store)
    requested: frozenset[type[Artifact]] = frozenset()
    history: list[PassRecord] = dataclasses.field(default_factory=list)
    run: RunState = dataclasses.field(default_factory=RunState, repr=False)
    borrowed: frozenset[int] = dataclasses.field(default=frozenset(), repr=False)

    def own_tensors(self) -> int:
        """Copy every tensor ``gm`` still shares with the model (ties kept), so that writing into ``gm`` never
        writes into the model; returns how many were copied."""
        if not self.borrowed:
            return 0
        copied = own_tensors(self.gm, set(self.borrowed))
        self.borrowed = frozenset()
        self.forget_tensors()
        return copied

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``tree.named_tensors(gm)``, computed once until ``forget_tensors`` (the manager calls it whenever a pass
        may have changed the module)."""
        if self.run.tensors is None:
            self.run.tensors = named_tensors(self.gm)
        return self.run.tensors

    def forget_tensors(self) -> None:
        self.run.tensors = None

    def analysis(self, kind: type[Artifact], compute: Callable[[CompileContext], Artifact]) -> Any:
        """The cached analysis of type ``kind``, computed by ``compute(ctx)`` if absent or invalidated."""
        if kind not in self.analyses:
            self.analyses[kind] = compute(self)
        return self.analyses[kind]

    def run_inner(self, passes: list) -> list[PassRecord]:
        """Run ``passes`` from inside the running pass through its manager (checked, recorded in its record)."""
        if self.run.manager is None:
            raise PassError("run_inner runs passes from inside a pass that a PassManager runs.")
        return self.run.manager.run_inner(self, passes)

    def invalidate(self, keep: Iterable[type[Artifact]] = ()) -> None:
        self.analyses.keep(keep)

    def require(self, pass_name: str, needed: Iterable[type[Artifact]]) -> None:
        missing = [n for n in needed if n not in self.analyses and n not in self.plans]
        if missing:
            raise PassError(
                f"[{pass_name}] needs {', '.join(repr(n.kind) for n in missing)}, which no earlier pass produced. "
                f"Run the pass that produces it first ({', '.join(sorted({n.owner for n in missing}))}; see "
                f"`fxcompress passes`)."
            )
