"""What every group object shares: its lifetime (close, ``with``, garbage collection), the
device status check, the active-rank mask, output descriptors and the lock that keeps one
group's calls from interleaving."""

from __future__ import annotations

import ctypes
import functools
import threading
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from . import _abi, _arrays, _library
from ._library import call, check_status, load
from ._results import Handle, _HeldHandle, _NotCopyable
from .errors import InvalidArgumentError, InvalidUsageError

_Method = TypeVar("_Method", bound=Callable[..., Any])

#: The error of a forward LL expert-major combine given no weights, at dispatch or at combine.
NO_COMBINE_WEIGHTS = ("topk_weights: given neither to dispatch nor to combine; the forward combine of LL expert-major "
                      "applies them")


def combine_weights_refused(layout: str, direction: int) -> str:
    """The error of combine weights given to a combine that takes none (`direction`: 0 forward)."""
    which = "the backward pass" if direction else f"the forward combine of layout {layout!r}"
    return (f"topk_weights: given to combine, but {which} takes no weights (only the forward combine of LL expert-major "
            "applies them; other layouts combine rows the experts weighted)")


def locked(method: _Method) -> _Method:
    """Runs `method` holding the group's lock: the C calls of one group never interleave, so a
    group shared between threads gives each call the result it would give alone."""

    @functools.wraps(method)
    def run(self, *arguments, **keywords):
        with self._lock:
            return method(self, *arguments, **keywords)

    return run  # type: ignore[return-value]


class GroupBase(_NotCopyable):
    """A group object holding an epGroup_t in ``_group`` (None once closed) on device ``_device``."""

    _copy_refusal = ("it owns the library's group (its buffers and steps), which a copy would share and free twice: pass "
                     "the group itself (threads may share it)")

    _group: Optional[ctypes.c_void_p] = None
    _lock: threading.RLock
    _device: int
    # The group's shape, set by _config.describe from the library's own view of the config.
    ranks: int
    experts: int
    local_experts: int
    top_k: int
    hidden: int
    max_tokens: int
    algorithm: str
    layout: str
    alignment: int
    dtype: str
    device: str
    recv_shape: Tuple[int, ...]
    recv_routing_shape: Optional[Tuple[int, ...]]

    def __new__(cls, *arguments: Any, **keywords: Any):
        self = super().__new__(cls)
        self._lock = threading.RLock()  # before __init__, so that close() always finds it
        return self

    @property
    def lock(self) -> threading.RLock:
        """The group's re-entrant lock. Every call holds it while it runs, so threads may share a
        group; a thread that needs a whole step (dispatch, then its combine) without another
        thread's dispatch between holds it itself: ``with group.lock: ...``."""
        return self._lock

    @locked
    def close(self) -> None:
        """Releases the group (also done when it is garbage-collected)."""
        group, self._group = getattr(self, "_group", None), None
        # A send-only call still pending is never completed now (complete() refuses a closed
        # group): the steps whose release waited for it go now, and later ones at once.
        self._release_deferred_steps()
        kept = self._kept
        if kept is not None:   # (its handles, dropped by the caller, go now: their steps are released at once)
            self._kept = tuple(value for value in kept if not isinstance(value, Handle))
        if group:
            call("epGroupDestroy", group)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @locked
    def check(self) -> None:
        """Waits for the group's GPU work and raises the first error recorded on the device
        (invalid routing, an overflow with overflow="fail", a timeout). The CPU backend reports
        errors from the calls themselves."""
        self._check_open()
        check_status(load().epGroupCheckStatus(self._group))   # (a routing error names topk_idx, as the calls' do)

    def synchronize(self) -> None:
        """The same as :meth:`check`."""
        self.check()

    @property
    @locked
    def active_ranks(self) -> List[int]:
        """The ranks that take part in calls (a rank that timed out is masked); on the GPU this
        waits for the device."""
        self._check_open()
        mask = ctypes.c_uint64()
        call("epGroupGetActiveRanks", self._group, ctypes.byref(mask))
        value = mask.value
        active = [r for r in range(self.ranks) if value >> r & 1]
        if len(active) < self.ranks and value != self._mask_known:
            # A mask seen here is seen by the torch ops too (a GPU group's device-side timeout read
            # before check() reports it, a rank masked through the raw C ABI). Only a mask this
            # group did not know moves the counter, which every group's ops compare: polling a
            # degraded group does not make another group's ops read their masks at every call.
            _library.mask_changes += 1
        self._mask_known = value
        return active

    #: The mask this group last read (active_ranks) or set (deactivate, clean) from a known one;
    #: None: none known.
    _mask_known: Optional[int] = None

    # -- steps (handles) ------------------------------------------------------------------------

    _own_step = 0   # updates of the group's own step: a handle of it is void after the next

    @locked
    def handle(self) -> Any:
        """A new step of the group's own (control path: allocates the step's routing metadata
        per rank, on a GPU 9 KB at ll-std's shape, 418 KB at ht-std's). Pass it as
        ``dispatch(..., handle=h)``; several can be live at once, and every rank makes the same
        calls with them in the same order. Release it with ``h.release()``, a ``with`` block, or
        by dropping it."""
        self._check_open()
        pointer = ctypes.c_void_p()
        call("epStepCreate", self._group, ctypes.byref(pointer))
        return _HeldHandle(self, pointer)

    def _release_step(self, handle, wait=True):
        # Also after close(): a live step keeps the library's group (and its device memory) alive.
        # A finalizer's (wait=False) does not wait for the group's lock: another thread may hold it
        # (``with group.lock:``) while it waits for this one. The step is no longer reachable, so
        # no call of the package uses it, and the library releases it under its own group lock.
        # The step of a pending send-only call is released once complete() has enqueued its
        # receiving half, which reads the step's device words (the library would free them now).
        # (The test and the deferral under the lock where it is taken: complete() on another thread
        # takes the deferred steps under it. A finalizer that does not take it has a handle no
        # pending call keeps, or one of a group nothing else reaches.)
        held = self._lock.acquire(blocking=wait)
        try:
            kept = self._kept
            if self._group and self._open_send_only is not None and kept is not None and any(value is handle for value in kept):
                self._deferred_steps = (self._deferred_steps or ()) + (handle,)
                return
            call("epStepDestroy", handle._pointer)
        finally:
            if held:
                self._lock.release()

    def _require_scales(self, scales):
        """FP8 pass-through groups take the scales of their e4m3 rows with them; the others none."""
        passes_fp8 = self._input_element == _abi.E4M3
        if passes_fp8 and scales is None:
            raise InvalidArgumentError("scales: None; an FP8 pass-through group takes the scales of its e4m3 rows")
        if scales is not None and not passes_fp8:
            raise InvalidArgumentError("scales: given; only FP8 pass-through groups take scales")

    def _check_handle(self, handle, dispatched):
        self._check_open()
        if not isinstance(handle, Handle) or handle.group is not self:
            raise InvalidArgumentError(
                "handle: must be the handle of a dispatch of this group (dispatch(...).handle) or one of group.handle()")
        if handle.released:
            raise InvalidUsageError("handle: released; make a new one with group.handle()")
        if not handle.own and handle.step != self._own_step:
            raise InvalidUsageError(
                f"handle: from step {handle.step}, but the group has dispatched step {self._own_step} since (its own "
                "step); combine each step before the next dispatch, or use group.handle() for steps that stay live together")
        if dispatched and handle.slot is None:
            raise InvalidUsageError("handle: its step has no dispatch yet")

    def _advance_step(self, target):
        """`target`'s step number for a new update: the group's own step voids its earlier handles
        (`_check_handle`); a handle of its own counts its updates, which an earlier result's
        ``layout`` compares."""
        if not target.own:
            self._own_step += 1
            target.step = self._own_step
        else:
            target.step += 1

    _kept: Any = None   # what a pending send-only combine's receiving half reads (tensors), kept alive for it

    @staticmethod
    def _kept_memory(value):
        """`value` (what a send-only call's receiving half reads or writes) with its memory held as
        it is now, as a flat tuple: a torch tensor with its alias (``.detach()``: the same storage,
        which a later ``.data =`` or ``set_()`` of the tensor would otherwise free while the
        library still reads or writes it), a list's or tuple's entries so (nested: ``out``'s
        pair of per-rank lists), None left out, anything else as it is. (A storage shrunk by
        ``untyped_storage().resize_()`` before complete() is freed whatever holds it: the
        docs ask that a send-only call's tensors keep their storage until complete().)"""
        if type(value) is list or type(value) is tuple:
            return tuple(held for v in value for held in GroupBase._kept_memory(v))
        if value is None or _arrays.kind(value) != "torch":
            return () if value is None else (value,)
        try:
            return (value, value.detach())
        except Exception:   # (a tensor with no memory to hold, which the call names: kept as it is)
            return (value,)

    _deferred_steps: Any = None   # steps released while the pending send-only call used them (released at complete())

    def _release_deferred_steps(self):
        """Releases the steps whose release waited for the pending send-only call (complete() has
        enqueued its receiving half, or the group is closing and nothing will)."""
        deferred, self._deferred_steps = self._deferred_steps, None
        for handle in deferred or ():
            call("epStepDestroy", handle._pointer)

    def _send_only_kept(self, expert_outputs, handle, topk_weights, weight_gradients, out):
        """What a send-only combine's receiving half (a kernel enqueued at complete() on the GPU)
        reads and writes, with its memory (`_kept_memory`): every rank's expert outputs, the
        weights it applies (given, or LL expert-major's dispatch's; HT expert-major's per-slot
        weights where the dispatch received them into the caller's arrays: a slot's the group
        keeps), the weight gradients, and ``out``; and the step's handle, whose release waits for
        complete() (`_release_step`)."""
        weights = getattr(handle, "topk_weights", None) if topk_weights is None else topk_weights
        slot = getattr(handle, "slot", None)
        received = getattr(handle, "received_weights", None) if type(slot) is int and slot < 0 else None
        return self._kept_memory((expert_outputs, weights, received, weight_gradients, out)) + (handle,)

    def _release_kept(self, stream):
        """Lets go of what the send-only call's receiving half reads, now that complete() has
        enqueued it on `stream`: a CUDA tensor is first marked in use by that stream, so the
        allocator reuses its memory only once the stream is past it; a step released meanwhile
        is released now (the library waits for the group's work before it frees the step)."""
        self._release_deferred_steps()
        kept, self._kept = self._kept, None
        if kept is None or self._device == -1:
            return
        from . import _fast

        on = _fast.torch_stream(self._device, stream)
        for value in kept:
            # One tensor (stacked), or a rank's tensors (a list or tuple of per-rank values).
            for tensor in (value if isinstance(value, (list, tuple)) else (value,)):
                if tensor is not None and getattr(tensor, "is_cuda", False):
                    tensor.record_stream(on)

    def _record(self, stream):
        """A CUDA event recorded on `stream` (None: the current one); None on the CPU."""
        if self._device == -1:
            return None
        import torch

        from . import _fast

        event = torch.cuda.Event()
        event.record(_fast.torch_stream(self._device, stream))
        return event

    # The send-only call ("dispatch" / "combine") whose receiving half complete() has not enqueued
    # yet: the library refuses every other data-path call until then, and so does the package,
    # before the call's bookkeeping (a refused call must leave the handles as they were).
    _open_send_only: Optional[str] = None

    # The hook of the send-only call `_open_send_only` names (a stale one must not complete a later call).
    _open_hook: Optional["_Hook"] = None

    def _refuse_open(self):
        self._check_open()   # (closed: nothing can complete the pending call now)
        raise InvalidUsageError(f"complete() the pending send-only {self._open_send_only} first (its result's hook(), "
                                "or group.complete())")

    def _dispatch_result(self, result, send_only, record_event, stream):
        """`result` (a DispatchResult) with (send_only) the hook that completes it and
        (record_event) the event recorded after it."""
        if send_only:
            self._open_send_only = "dispatch"
            result.hook = self._open_hook = _Hook(self, stream, "dispatch")
            # (its step, which the receiving half reads: released no sooner than complete(); and the
            # caller's arrays of a dispatch into out=, which the receiving half writes)
            handle = result.handle
            if handle.slot is None or handle.slot >= 0:
                self._kept = (handle,)
            else:   # (a stacked call's result keeps its stacked arrays: its per-rank lists are made on first read)
                stacked = result.__dict__.get("_stacked")
                arrays = (result.tokens, result.topk_idx, result.topk_weights, result.received, result.scales) if stacked is None else stacked
                self._kept = self._kept_memory((arrays, result.expert_counts)) + (handle,)
        if record_event:
            result.event = self._record(stream)
        return result

    def _combine_result(self, result, send_only, record_event, stream):
        """A combine's result, with (send_only) the hook that completes it and (record_event) the
        event recorded after it: ``result``, ``(result, hook)``, ``(result, event)`` or ``(result,
        hook, event)``."""
        extras: List[Any] = []
        if send_only:
            self._open_send_only = "combine"
            self._open_hook = _Hook(self, stream, "combine")
            extras.append(self._open_hook)
        if record_event:
            extras.append(self._record(stream))
        return (result, *extras) if extras else result

    def _check_open(self):
        if not self._group:
            raise InvalidUsageError("the group is closed")

    def _describe_output(self, value, ep_type, name):
        shape = tuple(int(s) for s in value.shape)
        return _arrays.tensor(value, name, dtypes={ep_type}, device=self._device, shape=shape)


class _Hook:
    """The receiving half of one send-only call (its result's ``hook``): enqueues it with the
    group's complete() on the call's stream, once. Called again, or after group.complete() took
    it, or once a later send-only call is open, it is refused: it would complete that later call."""

    __slots__ = ("group", "stream", "kind")

    def __init__(self, group: Any, stream: Any, kind: str) -> None:
        self.group, self.stream, self.kind = group, stream, kind

    def __call__(self) -> None:
        group = self.group
        if group._open_send_only is None or group._open_hook is not self:
            raise InvalidUsageError(f"hook(): this send-only {self.kind} was completed already (by its hook() or the group's "
                                    "complete()); a hook runs once")
        group.complete(stream=self.stream)
