"""The pass interface: a small class with options as ``__init__`` arguments and one ``run(ctx)``.

A pass declares its ``contract``:

- ``EXACT``: outputs unchanged within ``tolerance`` (checked by the manager against the previous stage),
- ``BOUNDED``: outputs change by at most a bound the pass states in ``error_bound(ctx)`` (relative to the
  output's scale),
- ``CHANGES``: the function is meant to change (pruning without masks, training); no numeric check.

what it ``requires`` (types of analyses or plans, ``fxcompress.plans``, that earlier passes must have produced),
``uses`` (types it reads when present) and ``produces``.
Options are stored as attributes of the same names, so ``options()`` can report and replay them.
"""
from __future__ import annotations

import dataclasses
import enum
import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import torch.fx

from .errors import PassError, RecipeError, did_you_mean
from .modules import quantization_stage
from .options import typed_init
from .plans import Artifact

if TYPE_CHECKING:
    from .context import CompileContext


def refuse_quantized(gm: torch.fx.GraphModule, pass_name: str, order: str) -> None:
    """A PassError when ``gm`` is already observed or quantized: ``pass_name`` cannot apply to it; ``order`` says
    where it belongs (\"prune before quantize\")."""
    stage = quantization_stage(gm)
    if stage is not None:
        what, node = stage
        raise PassError(f"[{pass_name}] the module is already {what} (node {node.name!r}), so {pass_name} cannot "
                        f"apply to it. {order}")


class Contract(enum.Enum):
    EXACT = "exact"
    BOUNDED = "bounded"
    CHANGES = "changes"


@dataclasses.dataclass(frozen=True)
class PassResult:
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()


class Pass:
    """Base of every pass.  Subclasses set ``name``, ``contract``, ``doc``; options go in ``__init__``, whose
    annotations are checked against every value given (``options.typed_init``)."""

    name: ClassVar[str]
    contract: ClassVar[Contract]
    requires: ClassVar[tuple[type[Artifact], ...]] = ()  # analyses and plans earlier passes must have made
    uses: ClassVar[tuple[type[Artifact], ...]] = ()  # read when present (an ON_REQUEST type is then made for it)
    produces: ClassVar[tuple[type[Artifact], ...]] = ()  # analyses and plans this pass leaves in the context
    preserves: ClassVar[tuple[type[Artifact], ...]] = ()  # analyses still valid after this pass modifies the graph
    # Whether the pass writes into existing parameter/buffer tensors (training, calibration, masks) rather than
    # replacing them: the manager's restore point then clones the tensors instead of sharing them.
    writes_tensors: ClassVar[bool] = False
    # For EXACT passes: |after - before| <= atol * max|before| + rtol * |before|, elementwise.
    exact_tolerance: ClassVar[tuple[float, float]] = (1e-5, 1e-5)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__fxc_typed__", False):
            cls.__init__ = typed_init(lambda: getattr(cls, "name", cls.__name__), init)

    def run(self, ctx: CompileContext) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} does not implement run(ctx)")

    def verify(self, ctx: CompileContext) -> None:
        """Optional pass-specific check after ``run``; raise ``VerificationError`` on failure."""

    def error_bound(self, ctx: CompileContext) -> float:
        """For BOUNDED passes: the largest allowed max|after - before| / max|before|."""
        raise NotImplementedError(f"{type(self).__name__} is BOUNDED but states no error_bound")

    def bound_hint(self, ctx: CompileContext) -> str:
        """For BOUNDED passes: what usually makes the error exceed the bound, and what to do (empty: nothing)."""
        return ""

    @classmethod
    def doc(cls) -> str:
        """The first line of the pass module's or class's docstring."""
        text = inspect.getdoc(cls) or inspect.getdoc(inspect.getmodule(cls)) or ""
        return text.strip().splitlines()[0] if text.strip() else ""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.option_names()}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Pass:
        """Build the pass from recipe options, naming any unknown option and the valid ones."""
        valid = cls.option_names()
        for key in options:
            if key not in valid:
                raise RecipeError(
                    f"pass {cls.name!r} has no option {key!r}.{did_you_mean(key, valid)} "
                    f"Valid options: {', '.join(valid) or '(none)'}."
                )
        return cls(**options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
