"""Base classes and shared input specs of the node classes."""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

from . import cluster
from .collective import node_tag
from .distribute import CODECS, LOSSLESS

CATEGORY = "cluster"

# The ordering input the cluster prompt rewrite adds to every communicating node (see
# comfy_nodes.server.prompts): it makes ComfyUI run the collectives in one canonical order on
# every rank.  Declared (optional, any type) so ComfyUI validates it; its value is ignored.
AFTER_INPUT = "cluster_after"


class AnyType(str):
    """A type name that matches every other in ComfyUI's input validation (``"*"``)."""

    __slots__ = ()

    def __ne__(self, other: object) -> bool:
        return False


ANY = AnyType("*")

_WEIGHTS = (
    "STRING",
    {
        "default": "",
        "tooltip": "Share of the batch per rank, e.g. '3,1' (read on the leader). Empty: the "
        "COMFY_CLUSTER_WEIGHTS variable, else equal shares.",
    },
)
_CODEC = (
    list(CODECS),
    {
        "default": LOSSLESS,
        "tooltip": "lossless keeps every value and the dtype; png is smaller on slow links but "
        "rounds every pixel to 8 bits.",
    },
)
_HIDDEN_ID = {"unique_id": "UNIQUE_ID"}


def _leader_input(type_name: str, what: str) -> tuple[str, dict[str, Any]]:
    # Lazy: only the leader evaluates what feeds it (``_FromLeader.check_lazy_status``), so a
    # follower does not recompute the leader's upstream (a whole generation, say) only to throw
    # it away.  The collectives still run in one order on every rank whatever else a rank
    # runs: the prompt rewrite chains them through ``cluster_after`` (an ordinary input), so a
    # collective upstream of a leader input runs everywhere, before this node.
    return (type_name, {"tooltip": f"{what} Only the leader's value is used.", "lazy": True})


class _Node:
    CATEGORY: ClassVar[str] = CATEGORY
    FUNCTION: ClassVar[str] = "run"
    DESCRIPTION: ClassVar[str] = ""

    @property
    def runtime(self) -> cluster.Runtime:
        """The process's cluster runtime (comfy_nodes.cluster): the node's communicator, and what
        surrounds its collectives (hand-overs, progress, interrupts, failure reports)."""
        return cluster.runtime()


class _ClusterNode(_Node):
    """Communicates or has side effects: runs every time, on every rank."""

    NOT_IDEMPOTENT: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("INPUT_TYPES")
        if isinstance(spec, classmethod):
            cls.INPUT_TYPES = classmethod(_with_after_input(spec.__func__))  # type: ignore[attr-defined]
        run = cls.__dict__.get("run")
        if run is not None:
            cls.run = _ignoring_after_input(run)  # type: ignore[attr-defined]

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")  # never equal to the previous value: never cached

    @classmethod
    def tag(cls, unique_id: Any) -> str:
        return node_tag(cls.__name__, None if unique_id is None else str(unique_id))


def _with_after_input(input_types: Any) -> Any:
    @functools.wraps(input_types)
    def wrapped(cls: type) -> dict[str, Any]:
        spec: dict[str, Any] = input_types(cls)
        optional = dict(spec.get("optional", {}))
        optional[AFTER_INPUT] = (
            ANY,
            {
                "tooltip": "Filled in automatically for cluster prompts: keeps the collectives in "
                "one order on every rank. Leave unconnected."
            },
        )
        return {**spec, "optional": optional}

    return wrapped


def _ignoring_after_input(run: Any) -> Any:
    @functools.wraps(run)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop(AFTER_INPUT, None)
        return run(self, *args, **kwargs)

    # Advertise the extra keyword (ComfyUI and tests introspect the function's signature).
    sig = inspect.signature(run)
    after = inspect.Parameter(AFTER_INPUT, inspect.Parameter.KEYWORD_ONLY, default=None)
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    wrapped.__signature__ = sig.replace(parameters=[*params[:at], after, *params[at:]])  # type: ignore[attr-defined]
    return wrapped


class _FromLeader(_ClusterNode):
    """A cluster node whose :func:`_leader_input` inputs (named in ``LEADER_INPUTS``) only the
    leader evaluates; followers get None for them and receive the leader's value instead."""

    LEADER_INPUTS: ClassVar[tuple[str, ...]] = ()

    def check_lazy_status(self, **inputs: Any) -> list[str]:
        """ComfyUI's lazy-input hook: the inputs still to evaluate before ``run``.  It passes a
        lazy input not evaluated yet as None (an unconnected one not at all) and asks again
        once what was named is evaluated; then nothing is missing (a value that is None
        itself is not asked for twice: ComfyUI drops names it evaluated already)."""
        if not self.runtime.is_leader():
            return []
        return [name for name in self.LEADER_INPUTS if name in inputs and inputs[name] is None]
