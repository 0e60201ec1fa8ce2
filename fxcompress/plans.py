"""Every kind of thing a pass hands to later passes, typed: the registry behind ``ctx.plans`` and ``ctx.analyses``.

As ``meta.py`` is for node metadata, this module is for what lives between passes.  Each type subclasses
:class:`Artifact` and states its ``kind`` (the name in summaries and saved files), its ``owner`` (the pass that
makes it) and its ``lifetime``:

- ``ANALYSIS``: derived from the graph alone (the channel groups); dropped when a pass changes the graph unless
  the pass lists it in ``preserves``.
- ``DECISION``: what a planner chose (``PruningPlan``, ``QuantPlan``, ``LowRankPlan``): frozen, printable as a
  summary, returned in ``result.plans``; it records the graph it was made for (:func:`graph_signature`), so it
  can be saved (:func:`save`), loaded and given back to ``compile(..., plans=...)``, where its planner applies it
  instead of deciding again.
- ``RESULT``: measured from data (the calibrated scales): kept, returned, saved and replayed like a decision.
- ``TRAINING``: masks the training loop re-applies after every step, kept while their shapes match.
- ``ON_REQUEST``: made only when a later pass of the pipeline requires it (the BN-fold records ``qat`` trains).

Passes declare ``requires`` / ``produces`` as tuples of these types; ``ctx.plans[PruningPlan]`` reads one.
Saved plans are plain data (``torch.load(..., weights_only=True)`` reads them): dataclasses become dicts tagged with
their registered class name, tensors stay tensors.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import torch
import torch.fx

from .errors import InputError, PassError

FORMAT = "fxcompress.plans/1"


class Lifetime(enum.Enum):
    ANALYSIS = "analysis"
    DECISION = "decision"
    RESULT = "result"
    TRAINING = "training"
    ON_REQUEST = "on request"


KINDS: dict[str, type[Artifact]] = {}  # kind -> type, filled as the defining modules are imported
DATA: dict[str, type] = {}  # class name -> plain-data class a saved plan may contain (see ``data_class``)


class Artifact:
    """Base of every type in ``ctx.plans`` / ``ctx.analyses``; subclasses set the three class attributes."""

    kind: ClassVar[str]
    owner: ClassVar[str]
    lifetime: ClassVar[Lifetime]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:
            return
        known = KINDS.get(cls.kind)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"plan kind {cls.kind!r} is taken by {known.__module__}.{known.__qualname__}")
        KINDS[cls.kind] = cls
        DATA[cls.__qualname__] = cls


def data_class(cls: type) -> type:
    """Register a dataclass that plans contain (``Site``, ``LayerRank``...) so that saved plans can rebuild it."""
    DATA[cls.__qualname__] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class Table(Artifact):
    """A plan that is a table by name (module, site or parameter target) -> entry; read like a dict."""

    entries: dict[str, Any]
    graph: str = ""  # graph_signature of the module it was made for ("" when not tied to one)

    def __getitem__(self, key: str) -> Any:
        return self.entries[key]

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str, default: Any = None) -> Any:
        return self.entries.get(key, default)

    def items(self):
        return self.entries.items()

    def keys(self):
        return self.entries.keys()

    def values(self):
        return self.entries.values()

    def summary(self) -> str:
        kinds = sorted({type(v).__name__ for v in self.entries.values()})
        return f"{len(self.entries)} entries" + (f": {', '.join(kinds)}" if kinds else "")


@dataclasses.dataclass(frozen=True)
class ChannelMasks(Table):
    """{tensor target: 0/1 mask along its channel dim}: what mask-mode ``remove_channels`` zeroed."""

    kind = "channel_masks"
    owner = "remove_channels"
    lifetime = Lifetime.TRAINING


@dataclasses.dataclass(frozen=True)
class WeightMasks(Table):
    """{parameter target: 0/1 mask of its elements}: what level pruning (``gradual_prune``) zeroed."""

    kind = "weight_masks"
    owner = "gradual_prune"
    lifetime = Lifetime.TRAINING


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


def graph_signature(gm: torch.fx.GraphModule) -> str:
    """A digest of the architecture: every node's name, op, target and inputs, and every parameter's and buffer's
    name and shape.  Independent of weight values, batch size and resolution, so a plan made on one copy of an
    architecture applies to another."""
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        h.update(f"{n.name}|{n.op}|{_target_name(n.target)}|{','.join(a.name for a in n.all_input_nodes)}\n".encode())
    for prefix, module in gm.named_modules():
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                h.update(f"{prefix}.{name}{tuple(t.shape)}\n".encode())
    return h.hexdigest()[:20]


def replayed(ctx: Any, kind: type[Artifact], pass_name: str) -> Any:
    """The plan of type ``kind`` given to ``compile(..., plans=...)``, checked against the graph ``pass_name`` is
    about to apply it to; None when none was given (the pass then decides as usual)."""
    plan = ctx.given.get(kind)
    if plan is None:
        return None
    made_for = getattr(plan, "graph", "")
    if made_for and made_for != graph_signature(ctx.gm):
        raise InputError(f"[{pass_name}] the {kind.kind} given to compile was made for another graph (signature "
                         f"{made_for}, this one {graph_signature(ctx.gm)}): a plan replays only on the architecture "
                         f"and pipeline position it was made for. Compile the same model with the same recipe "
                         f"before this pass, or drop the plan to decide again.")
    return plan


class Store:
    """Artifacts keyed by their type (``store[PruningPlan]``; the kind name works for reading); a value must be an
    instance of the type it is stored under."""

    def __init__(self, items: Iterable[Artifact] | dict | Store | None = None):
        self._items: dict[type[Artifact], Artifact] = {}
        if isinstance(items, (dict, Store)):
            items = items.values()
        for value in items or ():
            if not isinstance(value, Artifact):
                raise InputError(f"plans must be fxcompress plan objects (see fxcompress.plans.KINDS), got "
                                 f"{type(value).__name__}.")
            self._items[type(value)] = value

    @staticmethod
    def _type(key: type[Artifact] | str) -> type[Artifact]:
        if isinstance(key, str):
            if key not in KINDS:
                raise KeyError(f"no plan kind {key!r}; known kinds: {', '.join(sorted(KINDS))}")
            return KINDS[key]
        return key

    def __getitem__(self, key: type[Artifact] | str) -> Any:
        kind = self._type(key)
        if kind not in self._items:
            raise KeyError(f"no {kind.kind} here: {getattr(kind, 'owner', 'its owner')} makes it")
        return self._items[kind]

    def __setitem__(self, kind: type[Artifact], value: Artifact) -> None:
        if not (isinstance(kind, type) and issubclass(kind, Artifact) and isinstance(value, kind)):
            raise PassError(f"a {type(value).__name__} cannot be stored as {getattr(kind, '__name__', kind)!r}: "
                            f"plans are stored under their own registered type.")
        self._items[kind] = value

    def get(self, key: type[Artifact] | str, default: Any = None) -> Any:
        kind = self._type(key)
        return self._items.get(kind, default)

    def pop(self, key: type[Artifact] | str, default: Any = None) -> Any:
        return self._items.pop(self._type(key), default)

    def __contains__(self, key: object) -> bool:
        return (KINDS.get(key) if isinstance(key, str) else key) in self._items

    def __iter__(self) -> Iterator[type[Artifact]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, Artifact]]:
        return [(k.kind, v) for k, v in self._items.items()]

    def values(self) -> list[Artifact]:
        return list(self._items.values())

    def __repr__(self) -> str:
        return "\n".join(f"{kind}: {summary(value)}" for kind, value in self.items()) or "(no plans)"

    __str__ = __repr__

    def keep(self, kinds: Iterable[type[Artifact]]) -> None:
        """Drop every entry whose type is not in ``kinds``."""
        kinds = set(kinds)
        for kind in list(self._items):
            if kind not in kinds:
                del self._items[kind]


def summary(value: object, width: int = 100) -> str:
    """One line for any plan or analysis value: a plan's own ``summary()``, dataclasses field by field, containers
    by size, tensors by shape; never the contents of a tensor."""
    if hasattr(value, "summary") and callable(value.summary):
        text = value.summary()
        text = ", ".join(f"{k}={v}" for k, v in text.items()) if isinstance(text, dict) else str(text)
        return f"{type(value).__name__}({text})"[:width]
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, dict):
        kinds = sorted({type(v).__name__ for v in value.values()})
        return f"{{{len(value)} entries: {', '.join(kinds)}}}" if value else "{}"
    if isinstance(value, (list, tuple, set)):
        return f"{type(value).__name__} of {len(value)}"
    if dataclasses.is_dataclass(value):
        fields = ", ".join(f"{f.name}={summary(getattr(value, f.name), 40)}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({fields})"[:width]
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


# ---- saving ----------------------------------------------------------------------------------------------------

def encode(value: Any) -> Any:
    """Plain data for torch.save(weights_only-loadable): registered dataclasses as tagged dicts, tensors as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__qualname__
        if DATA.get(name) is not type(value):
            raise InputError(f"{name} is not a registered plan data class (fxcompress.plans.data_class), so it "
                             f"cannot be saved.")
        return {"__class__": name, **{f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {"__dict__": [(encode(k), encode(v)) for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InputError(f"a plan holds a {type(value).__name__}, which plans cannot save; plans hold plain data.")


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {decode(k): decode(v) for k, v in value["__dict__"]}
    name = value.get("__class__")
    if name not in DATA:
        raise InputError(f"the saved plans hold a {name!r}, which this version of fxcompress does not know.")
    return DATA[name](**{k: decode(v) for k, v in value.items() if k != "__class__"})


def save(plans: Iterable[Artifact] | dict | Store, path: str | Path) -> Path:
    """Write plans (``result.plans``, a Store, or a list of plans) to ``path``; :func:`load` reads them back."""
    store = plans if isinstance(plans, Store) else Store(plans)
    path = Path(path)
    torch.save({"format": FORMAT, "plans": [encode(v) for v in store.values()]}, path)
    return path


def load(path: str | Path) -> Store:
    """The plans saved by :func:`save` (no pickled code is run)."""
    data = torch.load(Path(path), weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path} is not a plans file written by fxcompress.save_plans.")
    return Store(decode(v) for v in data["plans"])
