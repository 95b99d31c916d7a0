"""What a dispatch returns: layout info, the step's handle, the result object."""

from __future__ import annotations

import ctypes
from typing import Any, Iterator, List, Optional, Tuple

from . import _abi, _arrays, _fast
from .errors import InvalidArgumentError, InvalidUsageError, NotCopyableError


class LayoutInfo:
    """What one rank received in a dispatch (counts are Python ints)."""

    __slots__ = ("expert_counters", "expert_offsets", "source_rank_counters", "expert_source_counters",
                 "received_total", "dropped_tokens")

    expert_counters: List[int]
    expert_offsets: List[int]
    source_rank_counters: List[int]
    expert_source_counters: List[List[int]]
    received_total: int
    dropped_tokens: int

    def __init__(self, expert_counters: List[int], expert_offsets: List[int], source_rank_counters: List[int],
                 expert_source_counters: List[List[int]], received_total: int, dropped_tokens: int) -> None:
        #: rows per local expert, ``[L]`` (HT expert-major: padding excluded)
        self.expert_counters = expert_counters
        #: first row of each local expert's zone, ``[L]`` (expert-major layouts; zeros otherwise)
        self.expert_offsets = expert_offsets
        #: (token, this rank) pairs received from each source rank, ``[R]``
        self.source_rank_counters = source_rank_counters
        #: rows per (local expert, source rank), ``[L][R]``
        self.expert_source_counters = expert_source_counters
        #: rows of the receive buffer in use (HT expert-major: padding included)
        self.received_total = received_total
        #: (token, this rank) pairs dropped by ``overflow="drop"``
        self.dropped_tokens = dropped_tokens

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayoutInfo) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"LayoutInfo({fields})"


class _LayoutBuffers:
    """Host arrays an epLayoutInfo_t points at."""

    def __init__(self, local_experts, ranks):
        self.local_experts, self.ranks = local_experts, ranks
        self.expert_counters = (ctypes.c_int64 * local_experts)()
        self.expert_offsets = (ctypes.c_int64 * local_experts)()
        self.source_rank_counters = (ctypes.c_int64 * ranks)()
        self.expert_source_counters = (ctypes.c_int64 * (local_experts * ranks))()
        self.struct = _abi.new(
            _abi.LayoutInfo,
            expertCounters=self.expert_counters, expertOffsets=self.expert_offsets,
            sourceRankCounters=self.source_rank_counters, expertSourceCounters=self.expert_source_counters)

    def value(self):
        flat = list(self.expert_source_counters)
        r = self.ranks
        return LayoutInfo(list(self.expert_counters), list(self.expert_offsets), list(self.source_rank_counters),
                          [flat[i * r:(i + 1) * r] for i in range(self.local_experts)],
                          self.struct.receivedTotal, self.struct.droppedTokens)


class _NotCopyable:
    """Refuses copy, deepcopy and pickle with NotCopyableError: the object owns state of the
    library's that a copy would share and free twice. `_copy_refusal` says what and what to do;
    the error names the class (`_copy_name`)."""

    __slots__ = ()
    _copy_refusal = ""

    @property
    def _copy_name(self) -> str:
        return type(self).__name__

    def __copy__(self):
        raise NotCopyableError(f"{self._copy_name}: cannot be copied or pickled; {self._copy_refusal}")

    __deepcopy__ = __reduce_ex__ = lambda self, *_: self.__copy__()  # noqa: E731


class Handle(_NotCopyable):
    """One step of a group: its routing and what was derived from it.

    :meth:`VirtualGroup.handle` makes one of its own (several can be live on a group: one per MoE
    layer, micro-batch or pass); a dispatch without ``handle=`` uses the group's own step, whose
    handle is void once the group's own step is updated again. Pass it to ``combine``, or to
    ``dispatch(..., handle=h)`` with ``topk_idx=None`` for a dispatch (forward again, or backward)
    with its routing. :meth:`release` frees a handle of its own (also on garbage collection and at
    the end of a ``with`` block); later calls with it fail.
    """

    __slots__ = ("group", "_pointer", "step", "slot", "slot_use", "tokens", "topk_idx", "topk_weights", "received_weights",
                 "weight_addresses", "weight_stacked", "released", "torch_routing", "routing_at", "__weakref__")   # made per dispatch: kept cheap

    _copy_name = "Handle"   # (a handle of its own too)
    _copy_refusal = ("it names one step of its group (a handle of its own frees that step when it is dropped, which a "
                     "copy would do twice): pass the handle itself")

    def __init__(self, group: Any, pointer: Any = None) -> None:
        self.group = group
        self._pointer = pointer   # ctypes.c_void_p of an epStep_t; None: the group's own step
        self.step = 0             # the group's own step: which of its updates this handle holds
        self.slot: Optional[int] = None
        self.slot_use = 0         # which dispatch into that slot wrote the handle's rows
        self.tokens: Any = None   # per rank: B_r
        self.topk_idx: Any = None  # kept alive: the GPU reads the routing again in combine
        self.routing_at: Any = None  # where topk_idx's memory was when the step took it (routing_at())
        self.topk_weights: Any = None
        self.received_weights: Any = None
        self.weight_addresses: Any = None  # per rank: the device address of its topk_weights
        self.weight_stacked: Any = None    # a stacked dispatch's: the address of its [R, B, K] topk_weights
        self.released = False
        # expert_parallel.torch's dispatch op: (the topk_idx it was given, that tensor's version),
        # which its combine op compares (the group's own step, made per dispatch, never has one)
        self.torch_routing: Any = None

    @property
    def own(self) -> bool:
        """True for a handle made by ``handle()``; False for the group's own step."""
        return self._pointer is not None

    def release(self) -> None:
        """Frees the step (a handle of its own; the group's own step needs no release)."""
        if self._pointer is not None and not self.released:
            self.released = True
            self.group._release_step(self)

    def _release_finalizing(self) -> None:
        """release() from a finalizer (garbage collection, a step token's callback): never waits
        for the group's lock, which another thread may hold while it waits for this one."""
        if self._pointer is not None and not self.released:
            self.released = True
            self.group._release_step(self, wait=False)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        kind = "own" if self.own else f"group step {self.step}"
        return f"Handle({kind}, slot={self.slot}, tokens={self.tokens}{', released' if self.released else ''})"


class _HeldHandle(Handle):
    """A handle of its own (``group.handle()``): its step is freed when it is collected. (The
    group's own step has nothing to free, so its handles, made per dispatch, have no finaliser.)"""

    __slots__ = ()

    def __del__(self) -> None:
        try:
            self._release_finalizing()
        except Exception:
            pass


class DispatchResult:
    """What a dispatch returns; lists hold one entry per rank (:class:`VirtualGroup`).

    - ``tokens``: the received rows, views of the group's buffer slot ``handle.slot`` (or the
      ``out=`` tensors); rows outside the received zones are unspecified (they hold earlier
      steps' rows; HT expert-major padding rows are written as zeros). Valid until the handle is
      released or the slot is reused (``buffer_slots`` dispatches later);
    - ``received``: the same rows as one ``[R, *recv_shape]`` tensor (with ``out=``: the caller's
      stacked array, or None for per-rank lists);
    - ``topk_idx`` / ``topk_weights``: the received local routing (``recv_routing_shape``; int32 /
      float32), or None for LL expert-major;
    - ``expert_counts``: ``[R, L]`` int32, rows per local expert, written on the stream (no host
      synchronisation); ``expert_source_counts``: ``[R, L, R]`` int32 per (expert, source rank);
    - ``layout``: a :class:`LayoutInfo` per rank, read on first use (on the GPU this waits): read it
      before the handle's next dispatch with new routing, after which it is refused (InvalidUsageError);
    - ``handle``: pass it to ``combine``; ``event``: a CUDA event recorded after the call (with
      ``record_event=True``); ``hook``: with ``send_only=True``, call it to enqueue the receiving half;
    - ``expert_outputs`` (:class:`NCCLGroup`): the slot's buffer to write the expert outputs into
      for a combine that copies nothing (None for a :class:`VirtualGroup`).
    """

    expert_outputs: Any = None

    def __init__(self, tokens: Any, topk_idx: Any, topk_weights: Any, handle: Handle, layout: Any = None, *,
                 received: Any = None, expert_counts: Any = None, expert_source_counts: Any = None,
                 event: Any = None, hook: Any = None) -> None:
        self.tokens = tokens
        self.topk_idx = topk_idx
        self.topk_weights = topk_weights
        self.handle = handle
        self._layout = layout
        self.received = received
        self.expert_counts = expert_counts
        self.expert_source_counts = expert_source_counts
        self.event = event
        self.hook = hook
        self.scales: Any = None   # FP8 groups: the received scales per rank
        self._step = handle.step  # the handle's update this result is of (layout reads that one's)

    @classmethod
    def _of_slot(cls, slot: Any, handle: Handle) -> "DispatchResult":
        """The result of a dispatch into buffer slot `slot` (views of its buffers, made once per
        slot; each result's lists of them its own, so that a caller who replaces an entry changes
        no later result)."""
        result = cls.__new__(cls)
        idx, w, scales = slot.idx_views, slot.w_views, slot.scale_views
        result.tokens, result.handle = list(slot.views), handle
        result.topk_idx, result.topk_weights = None if idx is None else list(idx), None if w is None else list(w)
        result._layout, result.received, result.event, result.hook = None, slot.received, None, None
        result.expert_counts, result.expert_source_counts = slot.counts, slot.source_counts
        result.scales = None if scales is None else list(scales)
        result._step = handle.step
        return result

    @classmethod
    def _of_rank_slot(cls, slot: Any, handle: Handle) -> "DispatchResult":
        """The result of an NCCL rank's dispatch into its buffer slot `slot` (the slot's own
        buffers, which the other ranks wrote; `expert_outputs`: the buffer they read back)."""
        result = cls.__new__(cls)
        result.tokens, result.topk_idx, result.topk_weights, result.handle = slot.tokens, slot.idx, slot.weights, handle
        result._layout, result.received, result.event, result.hook = None, None, None, None
        result.expert_counts, result.expert_source_counts, result.scales = slot.counts, slot.source_counts, slot.scales
        result.expert_outputs = slot.expert_outputs
        result._step = handle.step
        return result

    @property
    def layout(self) -> Any:
        """A :class:`LayoutInfo` per rank (:class:`VirtualGroup`) or this rank's (:class:`NCCLGroup`)."""
        if self._layout is None:
            handle = self.handle
            if handle.step != self._step:   # (the group's own step: _layout_of names a later dispatch of it)
                raise InvalidUsageError(
                    "layout: its handle has been updated with new routing since this dispatch (its layout is that step's "
                    "now); read result.layout before the handle's next dispatch with topk_idx, or use another handle")
            self._layout = handle.group._layout_of(handle)
        return self._layout

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``tokens, topk_idx, topk_weights, layout, handle``."""
        return iter((self.tokens, self.topk_idx, self.topk_weights, self.layout, self.handle))


class _StackedOutResult(DispatchResult):
    """A DispatchResult of a stacked dispatch into the caller's ``out=`` arrays: its per-rank
    lists (``tokens``, ``topk_idx``, ``topk_weights``: views of the stacked arrays) are made on
    first read, not per call (a caller that reads the stacked arrays it passed, as the torch
    ops do, never pays for R views each). Each result's lists are its own, as ever."""

    def __init__(self, stacked: Tuple[Any, Any, Any], handle: Handle, counts: Any) -> None:
        # (DispatchResult.__init__'s fields but the three lists, which its assignments would set)
        self._stacked = stacked
        self.handle, self._layout, self.received, self.expert_counts = handle, None, stacked[0], counts
        self.expert_source_counts = self.event = self.hook = self.scales = None
        self._step = handle.step

    def _lists(self, index: int) -> Any:
        listed = self.__dict__.get(f"_listed{index}", self)
        if listed is self:
            value = self._stacked[index]
            listed = None if value is None else list(value)
            self.__dict__[f"_listed{index}"] = listed
        return listed

    def _put(index: int) -> property:   # (a property per list; assigning one replaces it, as on any result)
        return property(lambda self: self._lists(index), lambda self, value: self.__dict__.__setitem__(f"_listed{index}", value))

    tokens = _put(0)
    topk_idx = _put(1)
    topk_weights = _put(2)
    del _put


_new = object.__new__


def own_step_result(group: Any, slot: Any, step: int, use: int, tokens: Any, topk_idx: Any, topk_weights: Any,
                    weight_stacked: Any) -> "DispatchResult":
    """The result of a stacked dispatch of the group's own step into buffer slot `slot` and its
    handle, each field of the handle written once (the data path), the result as
    DispatchResult._of_slot makes it."""
    handle = _new(Handle)
    handle.group, handle._pointer, handle.step, handle.slot, handle.slot_use = group, None, step, slot.index, use
    handle.tokens, handle.topk_idx, handle.topk_weights, handle.received_weights = tokens, topk_idx, topk_weights, slot.w_own
    handle.weight_addresses, handle.weight_stacked, handle.released, handle.torch_routing = None, weight_stacked, False, None
    handle.routing_at = topk_idx.data_ptr()   # (a stacked torch tensor: the common calls take no other)
    return DispatchResult._of_slot(slot, handle)


def routing_at(routing: Any) -> Any:
    """Where `routing` (a step's topk_idx) has its memory: a torch tensor's data_ptr(), a tuple of
    each rank's for per-rank ones, None for a NumPy array (only the CPU backend takes those, and it
    copies the routing at the update: no later call reads it there). The library keeps a torch
    tensor's address for the step's later calls, which read it again."""
    if type(routing) is tuple or type(routing) is list:
        return tuple(routing_at(value) for value in routing)
    return routing.data_ptr() if _arrays.kind(routing) == "torch" else None


def moved(handle: Any) -> bool:
    """Whether `handle`'s routing is no longer where its step took it (check_routing names it):
    the common calls' test, one comparison for a stacked tensor."""
    routing = handle.topk_idx
    return (routing.data_ptr() if type(routing) is _fast.tensor_type else routing_at(routing)) != handle.routing_at


def check_routing(handle: Any) -> None:
    """Raises the error naming the step's topk_idx (a rank's: ``topk_idx[i]``) whose memory is no
    longer where the step took it: changed in place since (``.data =``, ``set_()``, its storage
    resized), so that the call about to read it again would read memory the tensor no longer holds."""
    at = handle.routing_at
    if at is None:
        return
    now = routing_at(handle.topk_idx)
    if now == at:
        return
    name = "topk_idx"
    if type(at) is tuple:
        i = next(i for i, (a, b) in enumerate(zip(now, at)) if a != b)
        name = f"topk_idx[{i}]"
    raise InvalidArgumentError(
        f"{name}: its memory moved since the step's dispatch took it (.data =, set_() or a storage resize_() since); the "
        "step reads its routing again there: keep the routing tensor unchanged until the step's combine, or dispatch "
        "the new routing as a new step")
