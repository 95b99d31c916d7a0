"""expert_parallel.torch: dispatch and combine as differentiable PyTorch ops.

``Exchange(group)`` registers a :class:`~expert_parallel.VirtualGroup` (R ranks in this process,
on the CPU or one GPU) with the custom ops ``torch.ops.expert_parallel.dispatch`` /
``combine`` (and their backward calls), which autograd differentiates and ``torch.compile``
traces through their fake implementations (``fullgraph=True`` holds)::

    exchange = Exchange(group)
    sent = exchange.dispatch(x, topk_idx, topk_weights)     # x [R, B, H], routing [R, B, K]
    y = exchange.combine(experts(sent), sent)               # [R, B, H]
    y.sum().backward()                                      # x.grad, topk_weights.grad, ...

Every output is a tensor of its own (the group's buffer slots are not handed out), so autograd
keeps what it needs for as long as it needs it. An :class:`~expert_parallel.NCCLGroup` (this
process's rank of a torchrun job; HT, or LL rank-major) registers too: its tensors are the
rank's own, ``[B, H]`` in and out, with no leading ``R``. See docs/torch.md.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..errors import InvalidArgumentError, InvalidUsageError, NotCopyableError
from . import _autograd, _ops, _registry  # (_autograd registers the backward passes, and calls the ops)

__all__ = ["Exchange", "Dispatched"]

_STRIDED = torch.strided


def _tensor(value: Any, name: str, what: str) -> None:
    """Raises the named error unless `value` is a torch.Tensor (the ops' own check raises a
    RuntimeError, and None reached their implementations as an AttributeError). A sparse or
    nested one is named once the call has failed (`_not_dense`): the check costs nothing on the
    data path."""
    if not isinstance(value, Tensor):
        raise InvalidArgumentError(f"{name}: a {type(value).__name__}; must be a torch.Tensor {what}")


def _kind(value: Tensor) -> str:
    """What a tensor that is not dense is, as an error names it."""
    return "a nested tensor" if value.is_nested else f"a tensor of layout {value.layout}"


def _not_dense(*named: Tuple[str, Any, str]) -> Optional[InvalidArgumentError]:
    """The error naming the first of `named` ((name, value, what) triples) that is a tensor but not
    a dense one, or None. Asked once a call has failed: a nested tensor has no kernel of the ops
    (NotImplementedError), a sparse one no contiguous() (RuntimeError), a nested one no sizes
    (RuntimeError), and a sparse CSR one is 2-D (the ops' shape check); that error is replaced by
    this one, which says what is wrong."""
    for name, value, what in named:
        if isinstance(value, Tensor) and (value.is_nested or value.layout is not _STRIDED):
            return InvalidArgumentError(f"{name}: {_kind(value)}; must be a dense (torch.strided) torch.Tensor {what}")
    return None


class Dispatched(NamedTuple):
    """What :meth:`Exchange.dispatch` returns (stacked over the R ranks; over an NCCLGroup, this
    rank's, without the leading ``R``)."""

    #: ``[R, *group.recv_shape]``: the rows each rank received (zeros outside the received zones)
    tokens: Tensor
    #: ``[R, *group.recv_routing_shape]`` int32 local expert ids (-1: none within the received rows;
    #: rows past them hold 0, with weight 0, under ``zero_fill``); None for LL expert-major
    topk_idx: Optional[Tensor]
    #: the received float32 weights, shaped like ``topk_idx``; None for LL expert-major
    topk_weights: Optional[Tensor]
    #: the step token: a 0-dim int64 CPU tensor that keeps the step's routing live
    step: Tensor
    #: the source routing ``[R, B, K]`` given to dispatch: combine takes this tensor, unchanged
    #: (another one, or this one changed in place, is refused: :meth:`Exchange.combine`)
    routing: Tensor
    #: the source weights ``[R, B, K]`` given to dispatch (LL expert-major's combine applies them)
    weights: Optional[Tensor]
    #: ``[R, L]`` int32 rows each rank received per local expert, written on the stream (no host
    #: synchronisation): what a grouped GEMM over the received zones reads (HT expert-major:
    #: padding excluded; zone l starts at the earlier counts, each rounded up to group.alignment)
    expert_counts: Optional[Tensor] = None


class _Registration:
    """What an Exchange's registration lives as long as (its finalizer's referent): shared by the
    exchange's shallow copies, which share its id."""

    __slots__ = ("__weakref__",)


class Exchange:
    """A group's dispatch and combine as autograd-aware ops. Tensors are stacked over the ranks:
    tokens ``[R, B, H]`` of the group's dtype (bf16, f16 or f32), ``topk_idx`` ``[R, B, K]``
    int32 or int64, ``topk_weights`` ``[R, B, K]`` float32 (pad a rank with fewer tokens with
    routing -1). What the experts get, per layout:

    - LL expert-major: ``tokens`` ``[R, L, R*Bmax, H]``, zone l of rank r is expert ``r*L + l``;
      combine weights the rows with ``topk_weights`` (differentiable);
    - LL rank-major, HT flat: one row per (token, rank) with its local ids and weights; the
      experts weight and sum their outputs per row, combine sums the rows;
    - HT expert-major padded: ``[R, N, H]`` zones per local expert, one id and weight per row
      (-1 and 0 on padding); combine applies the per-row weights (``dispatched.topk_weights``).

    A step's routing stays live while its token (``Dispatched.step``), or the autograd graph that
    recorded the step, is referenced; its handle then returns to the exchange's pool (a copy of
    the token keeps nothing live: docs/torch.md, step-token lifetime). Every rank must be active:
    a group with a masked rank (``deactivate``, a timeout) is refused (InactiveRankError) until
    ``group.clean()``.

    Over an :class:`~expert_parallel.NCCLGroup` (one rank per process) every tensor is this rank's,
    without the leading ``R``: ``x`` ``[B, H]``, received ``tokens`` ``group.recv_shape``, combine
    ``[B, H]``. Its dispatch receives into a buffer slot its peers write, so the ops copy the rows
    out: the received zones only, into tensors made zeroed with ``zero_fill``, and the routing
    whole (cleared in the slot after, with ``zero_fill``). LL expert-major is refused (its
    combine's gradients need other ranks' weights and expert outputs), and so is a gradient for
    LL rank-major's ``topk_weights`` (they are at the ranks that received the rows); HT
    differentiates everything.

    ``zero_fill`` (default True): the received rows, and the gradient rows of the backward
    dispatch, start as zeros, so rows outside the received zones are zeros, whatever the experts
    do with them. That is a fill of the whole worst-case buffer per call (LL expert-major's
    ``[R, L, R*Bmax, H]`` is mostly padding). With ``zero_fill=False`` those rows are unspecified
    (leftovers of earlier tensors, possibly non-finite), and so are the received ``topk_idx`` /
    ``topk_weights`` there (LL rank-major, HT flat: not -1 / 0): for experts that read only the
    received rows of the expert-major layouts (a grouped GEMM over ``Dispatched.expert_counts``),
    whose results and gradients are then the same.
    """

    def __init__(self, group: Any, *, zero_fill: bool = True) -> None:
        if type(zero_fill) is not bool:
            raise InvalidArgumentError(f"zero_fill={zero_fill!r} (type {type(zero_fill).__name__}); must be a bool")
        self.group = group
        self.id: int = _registry.register(group, zero_fill)
        # An Exchange dropped without close() unregisters too (else the registry kept its group, and
        # the group's buffers, for the life of the process); not at exit, where the group goes anyway.
        # The finalizer watches a token the exchange's shallow copies share (copy.copy: the same id),
        # so that the registration ends with the last of them, not with the first one dropped.
        self._registration = _Registration()
        self._unregister = weakref.finalize(self._registration, _registry.unregister, self.id, False)
        self._unregister.atexit = False
        self.layout: str = group.layout
        entry = _registry.entry(self.id)
        #: an NCCLGroup: this process's rank's tensors, with no leading rank dimension
        self.one_rank: bool = entry.one_rank
        #: whether the received rows (and the backward dispatch's) start as zeros; see the class docs
        self.zero_fill = zero_fill
        self._lead = entry.lead   # the ops' leading dimensions: (R,), or () for an NCCL rank
        lead = "" if self.one_rank else "R, "
        # What dispatch's x, topk_idx and topk_weights must be, as its errors say it (made once).
        self._dispatch_inputs = (f"[{lead}B, hidden]", f"[{lead}B, top_k] int32 or int64", f"[{lead}B, top_k] float32")

    def dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor) -> Dispatched:
        """Starts a step with `topk_idx` and sends `x` to the ranks of its experts (every layout
        needs `topk_weights`: combine applies them, or the rows carry them; None is an
        InvalidArgumentError)."""
        if not (isinstance(x, Tensor) and isinstance(topk_idx, Tensor) and isinstance(topk_weights, Tensor)):
            rows, routing, weighting = self._dispatch_inputs
            _tensor(x, "x", rows)
            _tensor(topk_idx, "topk_idx", routing)
            _tensor(topk_weights, "topk_weights", weighting)
        if self.one_rank and self.layout == "rank_major" and topk_weights.requires_grad and torch.is_grad_enabled():
            raise InvalidUsageError(_autograd.RANK_MAJOR_WEIGHTS)
        carried = self.layout != "expert_major"
        try:
            received, idx, weights, step, counts = _autograd.dispatch(x, topk_idx, topk_weights if carried else None, self.id)
        except Exception:
            rows, routing, weighting = self._dispatch_inputs
            error = _not_dense(("x", x, rows), ("topk_idx", topk_idx, routing), ("topk_weights", topk_weights, weighting))
            if error is None:
                raise
            raise error from None
        if not carried:
            return Dispatched(received, None, None, step, topk_idx, topk_weights, counts)
        return Dispatched(received, idx, weights, step, topk_idx, topk_weights, counts)

    def combine(self, expert_outputs: Tensor, dispatched: Dispatched) -> Tensor:
        """Brings the expert outputs (shaped like ``dispatched.tokens``) back: ``[R, B, H]``.

        ``dispatched.routing`` must be the ``topk_idx`` its dispatch was given, unchanged since
        (LL expert-major's backward pass scatters the weights' gradients by it): a Dispatched made
        with ``_replace(routing=...)`` of another routing, or a routing changed in place since the
        dispatch, is an InvalidArgumentError naming ``dispatched.routing``. Another tensor with the
        same entries is taken on the CPU (compared there); on a GPU another tensor of the same shape
        is taken unseen, as comparing its entries would wait for the device. Not seen either: writes
        that no version counter records (through NumPy, DLPack or a raw pointer, or into an
        inference tensor)."""
        if not isinstance(expert_outputs, Tensor):
            _tensor(expert_outputs, "expert_outputs", "shaped like dispatched.tokens")
        if not isinstance(dispatched, Dispatched):
            raise InvalidArgumentError(f"dispatched: a {type(dispatched).__name__}; must be what this exchange's dispatch returned")
        try:
            self._check_dispatched(dispatched)
            weights = (dispatched.weights if self.layout == "expert_major"
                       else dispatched.topk_weights if self.layout == "expert_major_padded" else None)
            return _autograd.combine(expert_outputs, dispatched.routing, weights, dispatched.step, self.id)
        except Exception:
            error = _not_dense(("expert_outputs", expert_outputs, "shaped like dispatched.tokens"),
                               ("dispatched.routing", dispatched.routing, "(the topk_idx given to dispatch)"),
                               ("dispatched.weights", dispatched.weights, "or None"),
                               ("dispatched.topk_weights", dispatched.topk_weights, "or None"))
            if error is None:
                raise
            raise error from None

    def _check_dispatched(self, dispatched: Dispatched) -> None:
        """The fields of `dispatched` that combine passes on, checked to be of the kind its dispatch
        returned (a Dispatched is a NamedTuple: ``_replace`` makes any). A step token or routing on
        another device (``meta``) would send the op to its fake implementation, which returns an
        uninitialised tensor; a token of several values, or NaN, failed ``int()``; a routing
        without a ``[..., B, top_k]`` shape failed reading its B. (A sparse or nested token has
        several values, but for a 0-dim sparse copy of one, which holds its number as a dense
        copy does.)"""
        group, step, routing = self.group, dispatched.step, dispatched.routing
        if not (isinstance(step, Tensor) and step.dtype == torch.int64 and step.dim() == 0 and step.is_cpu):
            what = (f"a {type(step).__name__}" if not isinstance(step, Tensor)
                    else _kind(step) if step.is_nested or step.layout is not torch.strided
                    else f"a {step.dtype} tensor of shape {list(step.shape)} on {step.device}")
            raise InvalidArgumentError(f"dispatched.step: {what}; must be the step token dispatch returned (a 0-dim "
                                       "torch.int64 tensor on the CPU)")
        if not isinstance(routing, Tensor):
            _tensor(routing, "dispatched.routing", "(the topk_idx given to dispatch)")
        # In line; _require names what is wrong. The op reads only the routing's B, so a sparse one
        # would pass it (and fail LL expert-major's backward pass): its layout is checked here.
        # (A nested one has no sizes: RuntimeError, named by combine.)
        sizes, lead, device = routing.shape, self._lead, group._device
        shape = lead + (sizes[-2] if len(sizes) >= 2 else None, group.top_k)
        if (routing.layout is not _STRIDED or routing.dtype not in _ops._INDEX_TYPES or sizes != shape
                or not (routing.is_cpu if device < 0 else routing.get_device() == device)):
            error = _not_dense(("dispatched.routing", routing, "(the topk_idx given to dispatch)"))
            if error is not None:
                raise error
            _ops._require(routing, "dispatched.routing", _ops._INDEX_TYPES, shape, device, ", the topk_idx given to dispatch",
                          lead + (None, group.top_k))
        weights, received = dispatched.weights, dispatched.topk_weights
        if not (weights is None or isinstance(weights, Tensor)):
            _tensor(weights, "dispatched.weights", "or None")
        if not (received is None or isinstance(received, Tensor)):
            _tensor(received, "dispatched.topk_weights", "or None")

    def close(self) -> None:
        """Unregisters the group: no new steps, while the live ones' calls (a backward pass after a
        ``with`` block) still run until they end. The group itself stays open. Dropping the
        Exchange does the same."""
        if self._unregister.detach() is not None:   # (the finalizer's call, but waiting for the group's lock as any call)
            _registry.unregister(self.id)

    def __copy__(self) -> "Exchange":
        """A shallow copy, as ``copy.copy`` made one without this: another Exchange of the same
        registration (the same id and group), which ends with the last of them."""
        cls = type(self)   # (a subclass's copy is of the subclass, as copy.copy made it without this)
        copied = cls.__new__(cls)
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: dict) -> "Exchange":
        """This exchange itself: it registers a group, which owns the library's state and buffers
        (GPU memory), as a process group handle does, and a copy of a model that holds it
        (``ema = copy.deepcopy(model)``) exchanges through the same group. (A deep copy of the
        group is refused: ``NotCopyableError``.)"""
        memo[id(self)] = self
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise NotCopyableError(f"Exchange: cannot be pickled; it registers {type(self.group).__name__} {self.group!r} with "
                               "the ops, which owns the library's group (its buffers and steps): make the Exchange where it "
                               "is used (copy.deepcopy gives this one)")

    def __enter__(self) -> "Exchange":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Exchange(id={self.id}, {self.group!r})"
