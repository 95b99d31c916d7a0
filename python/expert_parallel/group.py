"""VirtualGroup: R ranks driven from one process, on the CPU or on one GPU."""

from __future__ import annotations

import ctypes
import math
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Union

from . import _abi, _arrays, _config, _fast, _library
from . import errors as _errors
from ._config import INT32 as _INT32
from ._config import choice as _choice
from ._config import integer as _int
from ._group_base import NO_COMBINE_WEIGHTS as _NO_COMBINE_WEIGHTS
from ._group_base import GroupBase, combine_weights_refused, locked
from ._library import addresses_entry, call, check_status, load
from ._results import DispatchResult, Handle, LayoutInfo, _LayoutBuffers, _StackedOutResult, check_routing, moved as _moved, own_step_result, routing_at
from ._slots import Slot
from ._types import Algorithm, Array, Direction, DType, Launch, Layout, Overflow, PerRank, Seconds
from .errors import InvalidArgumentError, InvalidUsageError

__all__ = ["VirtualGroup", "DispatchResult", "Handle", "LayoutInfo"]

_SIZE_HINT = "lower max_tokens or hidden (HT: set max_recv_tokens)"
_INDEX_TYPES = frozenset((_abi.I32, _abi.I64))
_F32_TYPES = frozenset((_abi.F32,))
_I32_TYPES = frozenset((_abi.I32,))
# dispatch()'s defaults, compared by identity on the data path (another equal string takes the general path)
_SINGLE, _FORWARD = "single", "forward"


def _device_ordinal(device):
    text = str(device)
    if text == "cpu":
        return -1
    if text == "cuda":
        return 0
    ordinal = _config.cuda_ordinal(device, text)
    if ordinal is not None:
        return ordinal
    raise InvalidArgumentError(f"device={device!r}; must be 'cpu', 'cuda' or 'cuda:N'")



def _held(values):
    """What a step keeps alive of per-rank `values` the library reads again later (combine reads the
    dispatch's weights, the GPU its routing): a list's entries as they are now, in a tuple of its
    own, since the caller may reuse its list (an entry replaced would free the tensor being read);
    one array as it is."""
    return tuple(values) if type(values) is list else values


def _kept_weights(handle):
    """Points `handle` (a forward LL expert-major step's) at where the topk_weights its dispatch
    was given (``handle.topk_weights``: one array, or a tuple of the per-rank ones), which its
    combine reads again, are now: a torch tensor's memory may have moved since the dispatch took
    its address (its storage shrunk by ``untyped_storage().resize_()`` and grown again, ``set_()``),
    and the old address would be read freed. Raises the error naming one whose storage no longer
    holds it (shrunk since), or which is no longer the dispatch's ``[B, K]`` float32 (``[R, B, K]``
    stacked; replaced in place by fewer elements, ``.data =`` or ``resize_()``), which the library
    would read past, or is a negative view (``.data = torch._neg_view(...)``), whose memory the
    library would read as it is, the values negated. (An NCCL rank's combine reads and
    checks them as it does weights given to it.)"""
    kept = handle.topk_weights
    stacked = type(kept) is not tuple
    tokens, k = handle.tokens, handle.group.top_k
    addresses = []
    for i, value in enumerate((kept,) if stacked else kept):
        seen = _fast.look(value, _F32_TYPES)
        if seen is None:
            addresses.append(None)
            continue
        name = "topk_weights" if stacked else f"topk_weights[{i}]"
        if _arrays.kind(value) == "torch":
            error = _arrays.storage_error(value, name)
            if error is not None:
                raise error
            if value.is_neg():   # (`.data =` a negative view: the library would read the memory, the values negated)
                raise InvalidArgumentError(
                    f"{name}: a negative view (is_neg() is True); must be False: its memory holds the values negated, which "
                    "this combine would read as they are: the tensor was changed in place (.data =) since the dispatch; "
                    "pass the weights to combine (topk_weights=...) instead")
        # The combine reads the dispatch's [B, K] float32 (stacked: [R, B, K]) at the array's
        # address: one changed in place since (torch: `.data =`, set_(), resize_(); NumPy:
        # resize(refcheck=False), which frees the memory the dispatch saw) may hold fewer bytes.
        shape = [len(tokens), tokens[0], k] if stacked else [tokens[i], k]
        numpy = _arrays.is_numpy(value)
        if list(value.shape) != shape or seen[1] != _abi.F32 or not seen[4]:
            how = "array was changed in place (resize())" if numpy else "tensor was changed in place (.data =, set_(), resize_())"
            raise InvalidArgumentError(
                f"{name}: {_described(value)} of {_arrays.describe_dtype(value)}{'' if seen[4] else ', not contiguous'}; "
                f"must be the dispatch's {shape} float32, contiguous, which this combine reads again: the {how} since the dispatch")
        addresses.append(seen[0] if (value.size if numpy else value.numel()) else None)
    if stacked:
        if addresses[0] is not None and addresses[0] != handle.weight_stacked:
            handle.weight_stacked, handle.weight_addresses = addresses[0], None
    elif handle.weight_addresses is not None:
        handle.weight_addresses = tuple(a if a is not None else old for a, old in zip(addresses, handle.weight_addresses))


def _described(value):
    """`value` as an error names what was passed: an array with its shape, a tuple or list with its length."""
    if _arrays.kind(value) is not None:
        return f"a {type(value).__name__} of shape {list(value.shape)}"
    if type(value) is tuple or type(value) is list:
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _backward_out(out, ranks):
    """The backward HT combine's ``out=`` pair (tokens, topk_weight_gradients), each a per-rank
    list or one stacked ``[R, B, ...]`` array, checked to be of that form: one array would unpack
    along its first dimension (R = 2) and a per-rank list of 2 tensors pass as the pair, either
    named as something it is not."""
    if (type(out) is tuple or type(out) is list) and len(out) == 2:
        bad = [(name, part) for name, part in zip(("tokens", "topk_weight_gradients"), out)
               if _arrays.kind(part) is not None and len(part.shape) != 3]
        if not bad:
            return out
        what = f"{_described(out)} whose {bad[0][0]} is {_described(bad[0][1])}"
    else:
        what = _described(out)
    raise InvalidArgumentError(f"out: {what}; the backward pass of HT takes a pair (tokens, topk_weight_gradients), "
                               f"each a per-rank list ({ranks} tensors) or one [R, B, ...] array")


def _option(value, name, table):
    """`table[value]`; a value it does not hold gets _choice's named error."""
    found = table.get(value) if isinstance(value, str) else None
    return found if found is not None else _choice(value, name, table)


class VirtualGroup(GroupBase):
    """R ranks in one process: on the CPU (``device="cpu"``, NumPy arrays or CPU torch tensors) or
    on one GPU (``device="cuda:N"``, CUDA torch tensors).

    ``algorithm``: "ll" (low latency) or "ht" (high throughput). ``layout``: "expert_major" or
    "rank_major" (LL), "flat" or "expert_major_padded" (HT, with ``alignment``, 1...1024 rows); default
    expert-major for LL, flat for HT. ``dtype``: the token element type ("bf16", "f16", "f32",
    "u8"); NumPy has no bf16, so bf16 arrays are uint16 arrays of the raw bits.
    ``max_recv_tokens``: HT receive capacity (None: one that never overflows). ``overflow``:
    "fail" or "drop", what an HT dispatch past that capacity does, on the CPU and the GPU (an LL
    group's buffers hold every row, so it never overflows and the setting has no effect there).
    ``timeout``: seconds any rank waits for another (0: the library's default, 10 s).
    ``fp8``: FP8 dispatch (docs/fp8.md; CPU and virtual GPU groups): rows move as e4m3 with a scale per
    block, "float32" (per 128), "ue8m0" (per 128) or "e8m0" (per 32); ``fp8_source="quantize"``
    quantises the ``dtype`` rows given to dispatch, ``"pass_through"`` takes e4m3 rows (torch
    ``float8_e4m3fn``, NumPy ``uint8`` codes) and ``scales=``. Combine stays in ``dtype``.
    ``multiprocessors``: GPU SMs the group may use (None: all; at most the device's, which a GPU
    group checks); a CPU group has no SMs to limit and refuses any count (one a GPU group refuses,
    such as 0 or -1, in the GPU group's words); ``tuning``: the GPU kernels' knobs
    (a dict: ``pipeline_depth``, ``rows_in_flight``, ``row_pieces``, ``blocks_per_multiprocessor``,
    ``update_chunk_tokens``, ``fused_update``, ``full_grid``, ``serial_launches``; ep-bench's
    ``--pipeline-depth``, ``--rows-in-flight``, ``--row-pieces``, ``--blocks-per-sm``,
    ``--update-chunk-tokens``, ``--fused-update`` / ``--no-fused-update``, ``--full-grid``,
    ``--serial-launches``); a CPU group runs no kernels, but refuses the tuning a GPU group would,
    with the same errors. ``buffer_slots``: how many sets of
    receive buffers the group owns (dispatches use them in turn), so that this many steps' rows
    can be in flight at once.

    Per-rank arguments are either a list of R arrays or one stacked array ``[R, B, ...]`` (the
    fast path: every rank the same B). Rows (tokens, expert outputs) that start off an 8-byte
    boundary (a view at an odd element of its storage) are taken alike either way: by a CPU
    group (a stacked array of them through the per-rank calls, not copied), refused by name by
    a GPU group, whose kernels read rows in 8-byte words. Outputs are views of the group's buffers (see
    :class:`DispatchResult`) unless ``out=`` names the caller's.
    """

    def __init__(self, ranks: int, experts: int, hidden: int, top_k: int, max_tokens: int, *,
                 algorithm: Algorithm = "ll", layout: Optional[Layout] = None, alignment: int = 1,
                 dtype: DType = "bf16", device: str = "cpu", max_recv_tokens: Optional[int] = None,
                 overflow: Overflow = "fail", timeout: Seconds = 10.0, multiprocessors: Optional[int] = None,
                 buffer_slots: int = 2, tuning: Optional[dict] = None, fp8: Optional[str] = None,
                 fp8_source: str = "quantize") -> None:
        library = load()
        self._group = None
        self._device = _device_ordinal(device)
        self.buffer_slots = _int(buffer_slots, "buffer_slots", 1, 64)
        config, self._element = _config.group_config(
            ranks=ranks, experts=experts, hidden=hidden, top_k=top_k, max_tokens=max_tokens, algorithm=algorithm,
            layout=layout, alignment=alignment, dtype=dtype, max_recv_tokens=max_recv_tokens, overflow=overflow,
            timeout=timeout, fp8=fp8, fp8_source=fp8_source)
        sms = 0 if multiprocessors is None else _int(multiprocessors, "multiprocessors", 1, _INT32)
        if sms and self._device == -1:   # (after the GPU group's own check: a value it refuses is refused in its words)
            raise InvalidArgumentError(f"multiprocessors={sms}; a CPU group (device='cpu') runs no kernels, so has no SMs to "
                                       "limit: must be None (it applies to device='cuda:N')")
        backend = _abi.new(
            _abi.BackendConfig,
            backend=_abi.BACKEND_HOST if self._device == -1 else _abi.BACKEND_VIRTUAL_GPU,
            device=max(self._device, 0),
            multiprocessors=sms,
            tuning=_config.tuning(tuning))
        group = ctypes.c_void_p()
        call("epGroupCreate", ctypes.byref(config), ctypes.byref(backend), ctypes.byref(group))
        self._group = group
        try:
            _config.describe(self, group, algorithm, self._element)
            _config.check_buffers(self, copies=self.ranks)
        except BaseException:
            self.close()
            raise
        self.device = _arrays.describe_device(self._device)
        self.multiprocessors = self._info().multiprocessors
        self._own_step = 0   # updates of the group's own step (GroupBase)
        self._slots: List[Optional[Slot]] = [None] * self.buffer_slots
        self._next_slot = 0
        self._steps: List[Any] = []
        self._prepare(library)

    def _info(self):
        info = _abi.new(_abi.GroupInfo)
        call("epGroupGetInfo", self._group, ctypes.byref(info))
        return info

    def _prepare(self, library):
        """The argument blocks every call patches in place."""
        r, k, h, device = self.ranks, self.top_k, self.hidden, self._device
        self._fn_update = library.epGroupUpdateAll
        self._fn_dispatch = library.epGroupDispatchAll
        self._fn_combine = library.epGroupCombineAll
        self._x = _fast.Descriptors(r, device, self._input_element, (h,))
        self._s = None if self.recv_scales_shape is None else _fast.Descriptors(
            r, device, self._scale_type, (self.recv_scales_shape[-1],))
        self._idx = _fast.Descriptors(r, device, _abi.I32, (k,))
        self._w = _fast.Descriptors(r, device, _abi.F32, (k,))
        self._update_inputs = (_abi.UpdateInputs * r)(
            *[_abi.new(_abi.UpdateInputs, topkIdx=self._idx.pointers[i]) for i in range(r)])
        self._dispatch_inputs = (_abi.DispatchInputs * r)(
            *[_abi.new(_abi.DispatchInputs, tokens=self._x.pointers[i], topkWeights=None) for i in range(r)])
        self._dispatch_weighted = False
        self._update_config = _abi.new(_abi.UpdateConfig)
        self._dispatch_config = _abi.new(_abi.DispatchConfig)
        self._combine_config = _abi.new(_abi.CombineConfig)
        recv, routing = self.recv_shape, self.recv_routing_shape
        self._y = _fast.Descriptors(r, device, self._element, recv[1:])
        # Forward combine weights: LL expert-major, the source's [B, K]; HT padded, the per-slot [N].
        self._cw = (_fast.Descriptors(r, device, _abi.F32, (k,)) if self.layout == "expert_major"
                    else _fast.Descriptors(r, device, _abi.F32, routing[1:]) if routing is not None else None)
        self._g = None if routing is None else _fast.Descriptors(r, device, _abi.F32, routing[1:])
        self._combine_inputs = (_abi.CombineInputs * r)(
            *[_abi.new(_abi.CombineInputs, expertOutputs=self._y.pointers[i]) for i in range(r)])
        self._combine_mode = (False, False)   # (weights given, backward HT): what the inputs point at
        # The stacked calls (one description per argument): the path of stacked [R, ...] arrays.
        self._fn_dispatch_stacked = addresses_entry("epGroupDispatchStacked")
        self._fn_combine_stacked = addresses_entry("epGroupCombineStacked")
        self._group_address = self._group.value   # (the group's handle as those take it)
        self._caller_dispatch = self._caller_combine = None   # the stacked calls into the caller's outputs (on first use)
        self._types_x, self._tail_x, self._tail_k = {self._input_element}, (h,), (k,)
        self._types_element = {self._element}
        # What _dispatch_common compares, in one tuple (an FP8 pass-through group's e4m3 rows come
        # with scales: never the common call).
        self._common = (r, h, self.max_tokens, k, -1 if self._input_element == _abi.E4M3 else self._input_element, device)
        # The last common dispatch's inputs as _dispatch_common saw them (_common_signature), with
        # their B and routing type: the next call's that compare equal are accepted at once.
        self._common_seen = (None, 0, 0, None)
        # And _combine_common (HT expert-major padded takes the general path: its weights are the slot's).
        self._common_combine = (self.layout == "expert_major", (r,) + tuple(recv),
                                -1 if self.layout == "expert_major_padded" else self._element, device,
                                (self.layout == "expert_major", False, False))   # (and the slot's combine_kind it takes)
        self._combine_seen = None   # the last common combine's expert outputs as it saw them (shape, dtype, device, contiguity)
        # The common calls through expert_parallel._torch_fast where it is built (_fast_spec_made):
        # its spec of this group, made on the first common call after torch is seen (None: the
        # Python path takes every call), and its two functions.
        self._fast_spec = _fast.UNMADE
        self._fast_dispatch = self._fast_combine = None
        self._row_bytes = h * _abi.DTYPE_SIZES[self._element]   # (a combined token's)
        # The common calls with per-rank lists (_dispatch_lists, _combine_lists): the last ones'
        # tensors as they saw them (_fast.per_rank's properties; the dispatch's with what
        # _list_signature made of them), and each rank's types and row counts that do not change.
        self._lists_seen = (None,)
        self._combine_lists_seen = None
        self._codes_x, self._codes_f32, self._codes_element = (self._input_element,) * r, (_abi.F32,) * r, (self._element,) * r
        self._recv_rows = (recv[0],) * r
        self._recv_bytes = (math.prod(recv) * _abi.DTYPE_SIZES[self._element],) * r   # (each rank's expert outputs)

    def __repr__(self) -> str:
        return (f"VirtualGroup(ranks={self.ranks}, experts={self.experts}, hidden={self.hidden}, top_k={self.top_k}, "
                f"max_tokens={self.max_tokens}, algorithm={self.algorithm!r}, layout={self.layout!r}, "
                f"dtype={self.dtype!r}, device={self.device!r})")

    # -- the step ----------------------------------------------------------------------------

    def dispatch(self, xs: PerRank, topk_idx: Optional[PerRank] = None, topk_weights: Optional[PerRank] = None, *,
                 handle: Optional[Handle] = None, direction: Direction = "forward", launch: Launch = "single",
                 out: Any = None, stream: Any = None, wait_event: Any = None, record_event: bool = False,
                 send_only: bool = False, scales: Optional[PerRank] = None) -> DispatchResult:
        """Sends every rank's tokens to the ranks of their top-k experts.

        ``xs``: ``[B, hidden]`` tokens per rank (a list, or one ``[R, B, hidden]`` array);
        ``topk_idx``: ``[B, top_k]`` int32 or int64 global expert ids per rank (-1: none), or None
        to dispatch again with ``handle``'s routing (a backward dispatch); ``topk_weights``:
        ``[B, top_k]`` float32 per rank (required except for LL expert-major, whose forward
        combine applies them). ``handle``: the step to use (None: the group's own step).
        ``out``: ``(tokens, topk_idx, topk_weights)`` of the caller's to receive into instead of
        the group's buffers: per-rank lists, or one stacked ``[R, ...]`` array each (with stacked
        inputs: one C call, as into the group's buffers; None for the routing of LL expert-major);
        a fourth entry, ``expert_counts`` (``[L]`` int32 per rank, or ``[R, L]``), gets the rows
        per local expert on the stream (``result.expert_counts``); an FP8 group receives e4m3
        tokens (torch ``float8_e4m3fn``, NumPy ``uint8``) and needs a fifth, the received
        ``scales`` (``recv_scales_shape`` per rank; the fourth may be None), ``result.scales``. On the GPU the calls are enqueued on
        ``stream`` (default: the current stream) after ``wait_event``, and return at once;
        ``record_event=True`` records ``result.event`` after them; ``send_only=True`` enqueues
        only the sending half: call ``result.hook()`` (or :meth:`complete`) before the received
        rows are used and before the group's next call. ``scales``: FP8 pass-through groups, the
        ``[B, scale words]`` scales of each rank's e4m3 rows (float32, or int32 words of exponent
        bytes); the received scales come back as ``result.scales``.
        """
        lock = self._lock   # (the @locked of the other methods, in line: this is the data path; acquire and release
        lock.acquire()      # cost half a with statement on an RLock)
        try:
            if self._open_send_only is not None:   # (as the library refuses it, before this call's bookkeeping)
                self._refuse_open()
            if send_only is not False and send_only is not True or record_event is not False and record_event is not True:
                _config.flags(send_only=send_only, record_event=record_event)
            if out is None and scales is None and launch is _SINGLE and direction is _FORWARD:
                result = self._dispatch_common(xs, topk_idx, topk_weights, handle, stream, wait_event, record_event, send_only)
                if result is None and (type(xs) is list or type(xs) is tuple):   # (after the stacked call: that one first)
                    result = self._dispatch_lists(xs, topk_idx, topk_weights, handle, stream, wait_event, record_event, send_only)
                if result is not None:
                    return result
            self._check_open()
            r = self.ranks
            mode = 0 if type(launch) is str and launch == "single" else _option(launch, "launch", _abi.LAUNCH_MODES)
            direction_value = 0 if type(direction) is str and direction == "forward" else _option(direction, "direction", _abi.DIRECTIONS)
            if handle is not None:
                self._check_handle(handle, dispatched=False)
            if topk_idx is None and (handle is None or handle.tokens is None):
                raise InvalidArgumentError("topk_idx: None; pass the step's routing, or a handle whose step has one")
            if topk_idx is None:
                check_routing(handle)
            if topk_weights is None and self.recv_routing_shape is not None:
                raise InvalidArgumentError(f"topk_weights: None; layout {self.layout!r} sends the weights with the tokens")

            if not isinstance(xs, (list, tuple)):
                caller = None if out is None else self._stacked_dispatch_out(out)
                if out is None or caller is not None:
                    parts = self._stacked_parts(xs, topk_idx, topk_weights, scales, handle)
                    if parts is not None:
                        return self._dispatch_stacked(parts, xs, topk_idx, topk_weights, handle, direction, direction_value, mode,
                                                      stream, wait_event, record_event, send_only, caller)

            h, k = self.hidden, self.top_k
            tokens, like = self._rows(xs, "xs", {self._input_element}, h, self._x, None)
            self._require_scales(scales)
            if scales is not None:
                self._rows(scales, "scales", {self._scale_type}, self.recv_scales_shape[-1], self._s, tokens)
                for i in range(r):
                    self._dispatch_inputs[i].scales = self._s.pointers[i]
            if topk_idx is not None:
                self._rows(topk_idx, "topk_idx", {_abi.I32, _abi.I64}, k, self._idx, tokens)
            elif list(tokens) != list(handle.tokens):
                raise InvalidArgumentError(f"xs: {tokens} tokens per rank; the handle's routing has {handle.tokens}")
            weighted = topk_weights is not None
            if weighted:
                self._rows(topk_weights, "topk_weights", {_abi.F32}, k, self._w, tokens)
            if weighted != self._dispatch_weighted:
                self._weigh_dispatch(weighted)

            if out is not None:
                outputs, out_views = self._caller_outputs(out)
            raw = self._stream_of(stream, wait_event)
            if out is None:   # (the rotation moves on once the library took the call: a refused one wrote no slot)
                slot = self._slot(self._next_slot, like)
                outputs = slot.dispatch_outputs
            else:
                slot = None
            target = handle
            if target is None:
                target = Handle(self)
            self._dispatch_ranks(target, tokens, topk_idx, topk_weights, direction, direction_value, mode, send_only, outputs, raw,
                                 _errors.DISPATCH_SLOT if slot is not None else _errors.DISPATCH_OUT, like)
            if slot is not None:
                return self._slot_result(slot, target, stream, send_only, record_event)
            target.slot = -1   # the caller's tensors
            target.received_weights = out_views[2]
            result = DispatchResult(out_views[0], out_views[1], out_views[2], target, expert_counts=out_views[3], received=out_views[4])
            result.scales = out_views[5]
            return self._dispatch_result(result, send_only, record_event, stream)
        finally:
            lock.release()

    def combine(self, expert_outputs: PerRank, handle: Handle, *, direction: Direction = "forward",
                weight_gradients: Optional[PerRank] = None, launch: Launch = "single", out: Any = None,
                stream: Any = None, wait_event: Any = None, record_event: bool = False,
                send_only: bool = False, topk_weights: Optional[PerRank] = None) -> Any:
        """Brings every rank's expert outputs back and reduces them into its tokens' order.

        ``expert_outputs``: per rank, shaped like ``dispatch(...).tokens[r]`` (``recv_shape``; a
        list or one ``[R, *recv_shape]`` array); ``handle``: the step's. Forward LL expert-major
        applies the ``topk_weights`` given to dispatch, or those given here (``[B_r, top_k]``
        float32 per rank, or one ``[R, B, top_k]`` array: read when the combine reduces, that is
        at ``hook()`` for ``send_only``); other layouts expect rows already weighted
        by the expert rank (HT expert-major uses the per-slot weights dispatch delivered). Returns
        the ``[B_r, hidden]`` combined tokens per rank (views of the handle's buffer slot, valid
        until the slot's next combine; arrays of their own for a step dispatched into ``out=``
        arrays; or ``out``: per-rank tensors of the caller's, or one
        ``[R, B, hidden]`` array, which with stacked expert outputs takes one C call); backward HT takes
        ``weight_gradients`` (shaped like ``dispatch(...).topk_weights``) and returns ``(tokens,
        topk_weight_gradients)`` (``out``: such a pair). ``stream``, ``wait_event`` as for dispatch; ``send_only=True``
        returns ``(result, hook)``: call ``hook()`` (or :meth:`complete`) before the result is
        used; ``record_event=True`` appends the event recorded after the call: ``(result, event)``
        or ``(result, hook, event)``.
        """
        lock = self._lock   # (as dispatch's)
        lock.acquire()
        try:
            if self._open_send_only is not None:   # (as the library refuses it, before this call's bookkeeping)
                self._refuse_open()
            if send_only is not False and send_only is not True or record_event is not False and record_event is not True:
                _config.flags(send_only=send_only, record_event=record_event)
            if send_only:   # its receiving half reads and writes them: keep their memory until complete() has enqueued it
                self._kept = self._send_only_kept(expert_outputs, handle, topk_weights, weight_gradients, out)
            if out is None and weight_gradients is None and topk_weights is None and launch is _SINGLE and direction is _FORWARD:
                result = self._combine_common(expert_outputs, handle, stream, wait_event, record_event, send_only)
                if result is None and (type(expert_outputs) is list or type(expert_outputs) is tuple):
                    result = self._combine_lists(expert_outputs, handle, stream, wait_event, record_event, send_only)
                if result is not None:
                    return result
            self._check_open()
            r = self.ranks
            direction_value = 0 if type(direction) is str and direction == "forward" else _option(direction, "direction", _abi.DIRECTIONS)
            mode = 0 if type(launch) is str and launch == "single" else _option(launch, "launch", _abi.LAUNCH_MODES)
            self._check_handle(handle, dispatched=True)
            check_routing(handle)
            backward_ht = direction == "backward" and self.algorithm == "ht"
            if weight_gradients is not None and not backward_ht:
                raise InvalidArgumentError("weight_gradients: only the backward pass of HT takes weight gradients")
            if backward_ht and weight_gradients is None:
                raise InvalidArgumentError("weight_gradients: None; the backward pass of HT needs them")
            forward_ll = direction_value == 0 and self.layout == "expert_major"
            if topk_weights is not None and not forward_ll:
                raise InvalidArgumentError(combine_weights_refused(self.layout, direction_value))
            if backward_ht and out is not None:
                _backward_out(out, r)
            if not isinstance(expert_outputs, (list, tuple)):
                caller = None if out is None else self._stacked_combine_out(out, handle.tokens, backward_ht)
                if (out is None and handle.slot >= 0) or caller is not None:
                    result = self._combine_stacked(expert_outputs, handle, direction, direction_value, mode, backward_ht,
                                                   weight_gradients, stream, wait_event, record_event, send_only, topk_weights, caller)
                    if result is not None:
                        return result
            tokens = handle.tokens
            recv = self.recv_shape
            _, like = self._rows(expert_outputs, "expert_outputs", {self._element}, recv[1:], self._y, [recv[0]] * r)

            weights = None
            if topk_weights is not None:   # (forward LL expert-major: checked above)
                self._rows(topk_weights, "topk_weights", _F32_TYPES, (self.top_k,), self._cw, list(tokens))
                weights = self._cw
            elif forward_ll:
                _kept_weights(handle)   # (read again: where they are now; named where their storage was shrunk)
                if handle.weight_addresses is None and handle.weight_stacked is not None:   # a stacked dispatch's [R, B, K]
                    step = tokens[0] * self.top_k * 4
                    handle.weight_addresses = tuple(handle.weight_stacked + i * step for i in range(r))
                if handle.weight_addresses is None:
                    raise InvalidArgumentError(_NO_COMBINE_WEIGHTS)
                self._cw.set_many(handle.weight_addresses, tuple(tokens), self._codes_f32)
                weights = self._cw
            elif direction == "forward" and self.layout == "expert_major_padded":
                if handle.slot >= 0:   # the per-slot weights are the slot's: a later dispatch into it rewrote them
                    self._require_slot(self._slots[handle.slot], handle)
                self._rows(handle.received_weights, "topk_weights", {_abi.F32}, self.recv_routing_shape[1:], self._cw,
                           [self.recv_routing_shape[0]] * r)
                weights = self._cw
            if backward_ht:
                routing = self.recv_routing_shape
                self._rows(weight_gradients, "weight_gradients", {_abi.F32}, routing[1:], self._g, [routing[0]] * r)
            if (weights is not None, backward_ht) != self._combine_mode:
                self._point_combine_inputs(weights is not None, backward_ht)

            slot = self._slots[handle.slot] if out is None and handle.slot >= 0 else None
            if slot is not None and slot.kind is type(like):
                combined, grads = slot.combine_targets(tokens, backward_ht)
                outputs = slot.combine_outputs
            elif out is None:
                # A step dispatched into the caller's arrays has no buffer slot: its combined rows get
                # arrays of their own (the next slot's rows may be another live step's result). So do
                # those of expert outputs of the other kind than the slot's (torch tensors after a
                # dispatch of NumPy arrays, or the reverse): the slot keeps its step's buffers.
                allocate = _arrays.Allocator(like)
                fresh: Any = [allocate.zeros((b, self.hidden), self._element, name="combined tokens") for b in tokens]
                if backward_ht:
                    fresh = (fresh, [allocate.zeros((b, self.top_k), _abi.F32, name="topk_weight_gradients") for b in tokens])
                if send_only:   # (the receiving half writes them: the caller may drop or rebind them before complete())
                    self._kept += self._kept_memory(fresh)
                outputs, combined, grads = self._caller_combine_outputs(fresh, tokens, backward_ht)
            else:
                outputs, combined, grads = self._caller_combine_outputs(out, tokens, backward_ht)

            result: Any = (combined, grads) if backward_ht else combined
            return self._combine_ranks(handle, outputs, result, direction_value, mode, stream, wait_event, record_event, send_only,
                                       _errors.COMBINE_OUT if out is not None else _errors.COMBINE_SLOT, like)
        except BaseException:
            if send_only and self._open_send_only is None:   # (refused: nothing pending keeps what it was given)
                self._kept = None
            raise
        finally:
            lock.release()

    @locked
    def complete(self, *, stream: Any = None) -> None:
        """Enqueues the receiving half of the last ``send_only`` dispatch or combine on ``stream``
        (default: the current stream); InvalidUsageError when none is pending. The CPU backend
        runs every call whole: completing it does nothing more."""
        self._check_open()
        raw = _fast.raw_stream(self._device, stream)
        try:
            call("epGroupComplete", self._group, raw)
        finally:   # (the library's pending call is taken at complete()'s start, whatever follows)
            self._open_send_only = None
        self._release_kept(stream)

    # -- the per-rank path ---------------------------------------------------------------------
    #
    # Per-rank arguments (lists of R arrays) take the per-rank calls, epGroupUpdateAll,
    # epGroupDispatchAll and epGroupCombineAll, which read an epTensor_t per rank and argument
    # (the Descriptors of _prepare). The common call (R plain torch tensors of each argument, of
    # the group's types on its device, forward, one launch, into a buffer slot) is taken in line
    # by _dispatch_lists / _combine_lists, which read each tensor's properties once; anything
    # else takes the general path in dispatch() / combine(), which names what is wrong.

    def _weigh_dispatch(self, weighted):
        """Points the dispatch inputs' topkWeights at their descriptors (`weighted`) or at none."""
        for i in range(self.ranks):
            self._dispatch_inputs[i].topkWeights = self._w.pointers[i] if weighted else None
        self._dispatch_weighted = weighted

    def _point_combine_inputs(self, weighted, backward_ht):
        """Points the combine inputs' topkWeights (`weighted`) and weightGradients (`backward_ht`)
        at their descriptors, or at none."""
        for i in range(self.ranks):
            entry = self._combine_inputs[i]
            entry.topkWeights = self._cw.pointers[i] if weighted else None
            entry.weightGradients = self._g.pointers[i] if backward_ht else None
        self._combine_mode = (weighted, backward_ht)

    def _dispatch_ranks(self, target, tokens, topk_idx, topk_weights, direction, direction_value, mode, send_only, outputs, raw,
                        output_error, like):
        """A dispatch's per-rank calls, its inputs' descriptors written: the update (`topk_idx`
        given: a new step on `target`, of `tokens` per rank), then the dispatch into `outputs`,
        and what `target` records of them (a forward dispatch's weights, which combine reads
        again). `output_error`, `like` (an input, whose kind of array is named): check_status's
        words for a refused dispatch."""
        pointer = target._pointer
        if topk_idx is not None:
            config = self._update_config
            config.launchMode = mode
            config.step = pointer
            self._start_step(target)
            check_status(self._fn_update(self._group, self._update_inputs, config, raw))
            target.tokens = tokens
            target.topk_idx = _held(topk_idx)
            target.routing_at = routing_at(target.topk_idx)
        config = self._dispatch_config
        config.direction, config.launchMode, config.step = direction_value, mode, pointer
        config.phase = _abi.PHASE_SEND_ONLY if send_only else _abi.PHASE_WHOLE
        status = self._fn_dispatch(self._group, self._dispatch_inputs, outputs, config, raw)
        if status:
            check_status(status, _errors.DISPATCH_XS, output_error, kind=_arrays.kind(like))
        if direction == "forward" and topk_weights is not None:
            target.topk_weights = _held(topk_weights)   # (combine reads them at these addresses)
            target.weight_addresses = tuple(self._w.addresses)
            target.weight_stacked = None

    def _combine_ranks(self, handle, outputs, result, direction_value, mode, stream, wait_event, record_event, send_only,
                       output_error, like):
        """A combine's per-rank call, its inputs' descriptors written, into `outputs` (whose
        per-rank views are `result`); returns combine()'s result. `output_error`, `like` (an
        input, whose kind of array is named): check_status's words for a refused combine."""
        raw = _fast.raw_stream(self._device, stream)
        if wait_event is not None:
            _fast.wait(self._device, stream, wait_event)
        config = self._combine_config
        config.direction, config.launchMode, config.step = direction_value, mode, handle._pointer
        config.phase = _abi.PHASE_SEND_ONLY if send_only else _abi.PHASE_WHOLE
        status = self._fn_combine(self._group, self._combine_inputs, outputs, config, raw)
        if status:
            check_status(status, output_error, kind=_arrays.kind(like))
        return self._combine_result(result, send_only, record_event, stream)

    def _dispatch_lists(self, xs, topk_idx, topk_weights, handle, stream, wait_event, record_event, send_only):
        """dispatch() of the common call with per-rank lists, in line: R torch tensors each of
        xs, topk_idx and topk_weights (_list_inputs), forward, one launch, into the next buffer
        slot (the overlap arguments as dispatch() takes them); as the general path makes it, with
        each tensor read once. None when the call is anything else: the general path takes it
        (and names what is wrong)."""
        common = self._list_inputs(xs, topk_idx, topk_weights)
        if common is None or not self._group:
            return None
        tokens, idx_codes, x_addresses, idx_addresses, w_addresses = common
        if handle is not None:
            self._check_handle(handle, dispatched=False)
        raw = self._stream_of(stream, wait_event)
        slot = self._slot(self._next_slot, xs[0])   # (installed once the library took the call)
        self._x.set_many(x_addresses, tokens, self._codes_x)
        self._idx.set_many(idx_addresses, tokens, idx_codes)
        self._w.set_many(w_addresses, tokens, self._codes_f32)
        if not self._dispatch_weighted:
            self._weigh_dispatch(True)
        target = handle if handle is not None else Handle(self)
        self._dispatch_ranks(target, list(tokens), topk_idx, topk_weights, "forward", 0, 0, send_only, slot.dispatch_outputs, raw,
                             _errors.DISPATCH_SLOT, xs[0])
        return self._slot_result(slot, target, stream, send_only, record_event)

    def _list_inputs(self, xs, topk_idx, topk_weights):
        """(B per rank, routing's epDataType_t per rank, and the addresses of xs, topk_idx and
        topk_weights per rank) of the common dispatch's per-rank lists: each a list or tuple of R
        plain torch tensors, rank r's ``[B_r, hidden]`` of the group's input type, ``[B_r, K]``
        int32 or int64 and ``[B_r, K]`` float32 (0 < B_r ≤ max_tokens), on the group's device,
        contiguous, their memory theirs (_fast.per_rank); None for anything else."""
        r = self.ranks
        if (type(topk_idx) is not list and type(topk_idx) is not tuple or type(topk_weights) is not list
                and type(topk_weights) is not tuple or len(xs) != r or len(topk_idx) != r or len(topk_weights) != r):
            return None
        read = _fast.per_rank((xs, topk_idx, topk_weights))
        if read is None:
            return None
        seen, addresses, rooms = read
        accepted = self._lists_seen
        if seen != accepted[0]:   # (one comparison when they are the last call's: a decode loop's)
            accepted = self._list_signature(seen)
            if accepted is None:
                return None
        if not _fast.held(accepted[3], rooms):
            return None
        return accepted[1], accepted[2], addresses[:r], addresses[r:2 * r], addresses[2 * r:]

    def _list_signature(self, seen):
        """(seen, B per rank, routing's epDataType_t per rank, each tensor's bytes) when `seen`
        (_fast.per_rank's reads of xs, topk_idx and topk_weights) is a common per-rank-list
        dispatch's (_list_inputs); kept as the one the next call compares with. None for anything
        else."""
        r, hidden, max_tokens, top_k, element, device = self._common
        codes = _fast.torch_codes
        tokens, idx_codes, x_bytes, idx_bytes = [], [], [], []
        for i in range(r):
            x_shape, x_type, x_device, x_fine = seen[4 * i:4 * i + 4]
            idx_shape, idx_type, idx_device, idx_fine = seen[4 * (r + i):4 * (r + i) + 4]
            w_shape, w_type, w_device, w_fine = seen[4 * (2 * r + i):4 * (2 * r + i) + 4]
            if len(x_shape) != 2:
                return None
            b, ic = x_shape[0], codes.get(idx_type)
            if not (x_shape[1] == hidden and 0 < b <= max_tokens and codes.get(x_type) == element
                    and (ic == _abi.I32 or ic == _abi.I64) and codes.get(w_type) == _abi.F32 and idx_shape == (b, top_k)
                    and w_shape == idx_shape and x_device == device and idx_device == device and w_device == device
                    and x_fine and idx_fine and w_fine):
                return None
            tokens.append(b)
            idx_codes.append(ic)
            x_bytes.append(b * hidden * _abi.DTYPE_SIZES[element])
            idx_bytes.append(b * top_k * _abi.DTYPE_SIZES[ic])
        sizes = tuple(x_bytes + idx_bytes + [b * top_k * 4 for b in tokens])
        accepted = self._lists_seen = (seen, tuple(tokens), tuple(idx_codes), sizes)
        return accepted

    def _combine_lists(self, expert_outputs, handle, stream, wait_event, record_event, send_only):
        """combine() of the common call with per-rank lists, in line: a list or tuple of R plain
        torch tensors ``[*recv_shape]`` of the group's type on its device, contiguous, their
        memory theirs, forward, one launch, into the slot of a live handle (an HT expert-major
        padded group: never), LL expert-major applying the weights a per-rank-list dispatch gave,
        where it took them (_kept_list_weights); the overlap arguments as combine() takes them.
        None when the call is anything else: the general path takes it (and names what is wrong)."""
        if (not isinstance(handle, Handle) or handle.group is not self or handle.released or not self._group
                or (handle._pointer is None and handle.step != self._own_step) or len(expert_outputs) != self.ranks):
            return None
        index = handle.slot
        if index is None or index < 0:
            return None
        slot = self._slots[index]
        forward_ll, _, element, _, _ = self._common_combine
        if (slot is None or slot.kind is not _fast.tensor_type or element == -1 or forward_ll and not self._kept_list_weights(handle)
                or _moved(handle)):   # (its routing moved since: the general path names it)
            return None
        read = _fast.per_rank((expert_outputs,))
        if read is None:
            return None
        seen, addresses, rooms = read
        if seen != self._combine_lists_seen and not self._combine_list_signature(seen):
            return None
        if not _fast.held(self._recv_bytes, rooms):
            return None
        self._y.set_many(addresses, self._recv_rows, self._codes_element)
        tokens = handle.tokens
        if forward_ll:
            self._cw.set_many(handle.weight_addresses, tuple(tokens), self._codes_f32)
        if (forward_ll, False) != self._combine_mode:
            self._point_combine_inputs(forward_ll, False)
        return self._combine_ranks(handle, slot.combine_outputs, slot.combined_rows(tokens), 0, 0, stream, wait_event, record_event,
                                   send_only, _errors.COMBINE_SLOT, expert_outputs[0])

    def _combine_list_signature(self, seen):
        """Whether `seen` (_fast.per_rank's reads of per-rank expert outputs) is a common
        per-rank-list combine's (_combine_lists), kept as the one the next call compares with."""
        recv, element, device, codes = tuple(self.recv_shape), self._element, self._device, _fast.torch_codes
        for i in range(0, len(seen), 4):
            shape, dtype, where, fine = seen[i:i + 4]
            if not (shape == recv and codes.get(dtype) == element and where == device and fine):
                return False
        self._combine_lists_seen = seen
        return True

    @staticmethod
    def _kept_list_weights(handle):
        """Whether the per-rank topk_weights a per-rank-list dispatch gave (``handle.topk_weights``,
        a tuple of torch tensors) are still where it took them (``handle.weight_addresses``), the
        step's ``[B, K]`` float32, contiguous, not negative views, and their storages hold them:
        _kept_weights would find nothing to move, nor to name (a view of another type at the same
        address, such as ``.data = w.view(torch.int32)``, or a negative one, it names). (Their
        bytes as they are now, which its storage_error compares: a contiguous tensor's elements
        reach its nbytes from its address.)"""
        kept, recorded = handle.topk_weights, handle.weight_addresses
        if type(kept) is not tuple or recorded is None:
            return False
        tensor, k, codes = _fast.tensor_type, handle.group.top_k, _fast.torch_codes
        try:
            for value, address, b in zip(kept, recorded, handle.tokens):
                if (type(value) is not tensor or value.data_ptr() != address or value.shape != (b, k) or not value.is_contiguous()
                        or codes.get(value.dtype) != _abi.F32 or not value.nbytes or not _fast.sound(value, address)):
                    return False   # (another type's view, a negative one, a shrunk storage: named there)
        except RuntimeError:
            return False
        return True

    # -- the active-rank mask ----------------------------------------------------------------

    @locked
    def deactivate(self, rank: int) -> None:
        """Masks `rank` inactive: it sends and receives nothing until cleaned."""
        self._check_open()
        rank = _int(rank, "rank", 0, self.ranks - 1)
        call("epGroupDeactivateRank", self._group, rank)
        _library.mask_changes += 1
        if self._mask_known is not None:   # (active_ranks then reports this mask without moving the counter again)
            self._mask_known &= ~(1 << rank)

    @locked
    def clean(self, ranks: Optional[Iterable[int]] = None) -> None:
        """Marks `ranks` (rank numbers; default: all) active again. Call between steps only."""
        self._check_open()
        if ranks is None:
            chosen = list(range(self.ranks))
        else:
            try:
                if isinstance(ranks, (str, bytes)):
                    raise TypeError
                chosen = list(ranks)
            except TypeError:
                raise InvalidArgumentError(
                    f"ranks={ranks!r} (type {type(ranks).__name__}); must be an iterable of rank numbers in "
                    f"[0, {self.ranks - 1}] (e.g. [{ranks!r}] for one rank) or None for every rank") from None
        mask = 0
        for i, r in enumerate(chosen):
            mask |= 1 << _int(r, f"ranks[{i}]", 0, self.ranks - 1)
        call("epGroupCleanRanks", self._group, mask)
        if self._mask_known is not None:
            self._mask_known |= mask

    # -- the stacked path ----------------------------------------------------------------------
    #
    # _off_boundary: the stacked calls (one description per argument) read rows in 8-byte words,
    # so they refuse an array of rows (xs, expert_outputs, out tokens, out) that starts off an
    # 8-byte boundary (a view at an odd element: buffer[1:].view(...)). A CPU group's per-rank
    # calls read any element-aligned row, so there such an array takes the per-rank path, as the
    # same rows given as a list do, without a copy: stacked or listed, the rows are taken alike.
    # A GPU group refuses them either way, by name (its kernels read rows in 8-byte words too).
    # Only an address found off the boundary leaves the stacked path: one test of an address the
    # call has in hand.

    def _stacked_parts(self, xs, topk_idx, topk_weights, scales, handle):
        """(B, x, idx, weights, scales) of stacked ``[R, B, ...]`` arguments, each (address,
        type) or None, checked as the per-rank path checks them; None when one is a list (the
        per-rank path takes those). Nothing is written before every argument is checked."""
        if scales is None:
            common = self._common_inputs(xs, topk_idx, topk_weights)
            if common is not None:   # the common forward call's three tensors (anything unusual: _stacked names the problem)
                b, ic, (x, idx, w) = common
                return b, (x, self._input_element, b), (idx, ic, b), (w, _abi.F32, b), None
        x = self._stacked(xs, "xs", self._types_x, self._tail_x, None)
        if x is None:
            return None
        b = x[2]
        if b == 0:   # empty arrays have no address, which the stacked calls read as "not given": the per-rank path
            return None
        if x[0] & 7 and self._device == -1:   # rows off an 8-byte boundary: the per-rank path (_off_boundary)
            return None
        idx = w = s = None
        if topk_idx is not None:
            idx = self._stacked(topk_idx, "topk_idx", _INDEX_TYPES, self._tail_k, b)
            if idx is None:
                return None
        elif list(handle.tokens) != [b] * self.ranks:
            raise InvalidArgumentError(f"xs: {[b] * self.ranks} tokens per rank; the handle's routing has {handle.tokens}")
        if topk_weights is not None:
            w = self._stacked(topk_weights, "topk_weights", _F32_TYPES, self._tail_k, b)
            if w is None:
                return None
        if scales is not None or self._input_element == _abi.E4M3:
            self._require_scales(scales)
            s = self._stacked(scales, "scales", {self._scale_type}, (self.recv_scales_shape[-1],), b)
            if s is None:
                return None
        return b, x, idx, w, s

    def _stacked(self, values, name, expected, tail, rows):
        """(address, type, B) of one stacked ``[R, B, *tail]`` array (B = `rows` unless None:
        any ≤ max_tokens), checked; None when `values` is not one array."""
        tensor = type(values) is _fast.tensor_type
        if tensor:   # a torch tensor: _fast.look in line
            try:
                address, code, sizes = values.data_ptr(), _fast.torch_codes.get(values.dtype), values.shape
                where, fine = values.get_device(), values.is_contiguous()
            except RuntimeError:   # a sparse or nested tensor: look() and _fast.check name it
                address, code, sizes, where, fine = _fast.look(values, expected)
            if where < 0 and not values.is_cpu:
                where = -2   # a meta tensor (or another device's): -1 is the CPU's alone
            seen = (address, code, sizes, where, fine)
        else:
            seen = _fast.look(values, expected)
            if seen is None:
                return None
            address, code, sizes, where, fine = seen
        # The common case in line; anything else goes through _fast.check, which names the problem.
        if not (fine and where == self._device and code in expected and len(sizes) == len(tail) + 2 and sizes[0] == self.ranks
                and (rows is None or sizes[1] == rows) and sizes[2:] == tail
                and (_fast.sound(values, address) if tensor else _arrays.kind(values) != "torch")):
            address, code, sizes = _fast.check(values, name, expected, self._device, (self.ranks, rows) + tail, seen)
            if self._device != -1 and _arrays.kind(values) != "torch":
                raise InvalidArgumentError(f"{name}: a NumPy array; a GPU group takes CUDA torch tensors")
        b = sizes[1]
        if rows is None and b > self.max_tokens:
            raise InvalidArgumentError(f"{name}: {b} tokens per rank; must be ≤ max_tokens ({self.max_tokens})")
        return address, code, b

    def _dispatch_common(self, xs, topk_idx, topk_weights, handle, stream, wait_event, record_event, send_only):
        """dispatch() of the common call, in line: three stacked tensors ``[R, B, ...]`` of the
        group's types on its device, forward, one launch, into the next buffer slot (the overlap
        arguments as dispatch() takes them). None when the call is anything else: the general
        path takes it (and names what is wrong)."""
        spec = self._fast_spec
        if (spec is not None and type(xs) is _fast.tensor_type and handle is None and stream is None and wait_event is None
                and record_event is False and send_only is False and self._group):
            # The decode loop's call with torch tensors, read in C++ (_torch_fast.dispatch: the
            # checks of _common_inputs; None for anything else, nothing written).
            if spec is _fast.UNMADE:
                spec = self._fast_spec_made()
            index = self._next_slot
            slot = self._slots[index]
            if spec is not None and slot is not None and slot.kind is type(xs):
                call = slot.dispatch_call or self._dispatch_call(slot)
                device = self._device
                done = self._fast_dispatch(spec, xs, topk_idx, topk_weights, call.address, None if device == -1 else _fast.raw_stream(device))
                if done is not None:
                    call._call = call._fields = None   # (its words are the C++ call's now: a Python call writes them all again)
                    call._set.clear()
                    self._own_step += 1   # earlier handles of the group's own step are void from here on
                    status, b, _, weights = done
                    if status:
                        check_status(status, _errors.DISPATCH_XS, _errors.DISPATCH_SLOT, kind="torch")
                    self._next_slot = (index + 1) % self.buffer_slots
                    self._slots[index] = slot
                    slot.use = use = slot.use + 1
                    return own_step_result(self, slot, self._own_step, use, [b] * self.ranks, topk_idx, topk_weights, weights)
        common = self._common_inputs(xs, topk_idx, topk_weights)
        if common is None or not self._group:
            return None
        b, ic, (x_address, idx_address, weights) = common
        ranks, element = self.ranks, self._common[4]
        if handle is not None:
            self._check_handle(handle, dispatched=False)
        device = self._device   # (_stream_of in line)
        raw = None if device == -1 and stream is None else _fast.raw_stream(device, stream)
        if wait_event is not None:
            _fast.wait(device, stream, wait_event)
        index = self._next_slot
        slot = self._slots[index]
        if slot is None or slot.kind is not type(xs):
            slot = self._slot(index, xs)   # (installed once the library took the call)
        call = slot.dispatch_call or self._dispatch_call(slot)
        call.dispatch_arguments(x_address, element, idx_address, ic, weights, b,
                                _abi.PHASE_SEND_ONLY if send_only else _abi.PHASE_WHOLE, None if handle is None else handle._pointer)
        if handle is None or handle._pointer is None:
            self._own_step += 1   # earlier handles of the group's own step are void from here on
        if handle is not None:
            if handle._pointer is None:
                handle.step = self._own_step
            else:
                handle.step += 1   # (a handle of its own: its updates, which earlier results' layout compares)
            handle.tokens = handle.slot = None   # (no dispatch, should the call fail)
        status = self._fn_dispatch_stacked(self._group_address, call.address, raw)
        if status:
            check_status(status, _errors.DISPATCH_XS, _errors.DISPATCH_SLOT, kind=_arrays.kind(xs))
        if handle is None and not send_only and not record_event:   # the decode loop's call: every field written once
            # The slot taken, as _slot_result takes it for the other calls (a refused call took none).
            self._next_slot = (index + 1) % self.buffer_slots
            self._slots[index] = slot
            slot.use = use = slot.use + 1
            return own_step_result(self, slot, self._own_step, use, [b] * ranks, topk_idx, topk_weights, weights)
        target = handle
        if target is None:
            target = Handle(self)
            target.step = self._own_step
        target.tokens = [b] * ranks
        target.topk_idx, target.routing_at = topk_idx, routing_at(topk_idx)
        target.topk_weights = topk_weights
        target.weight_addresses = None
        target.weight_stacked = weights
        return self._slot_result(slot, target, stream, send_only, record_event)

    def _slot_result(self, slot, target, stream, send_only, record_event):
        """A dispatch's result: `target`'s step now in buffer slot `slot`, with the hook
        (send_only) and the event recorded after the call (record_event)."""
        target.slot = slot.index
        target.slot_use = slot.use = slot.use + 1
        self._next_slot = (slot.index + 1) % self.buffer_slots   # (a refused dispatch took no slot)
        self._slots[slot.index] = slot   # (a slot made for this call: a refused one left the live step's in place)
        target.received_weights = slot.w_own
        return self._dispatch_result(DispatchResult._of_slot(slot, target), send_only, record_event, stream)

    def _fast_spec_made(self, entries=None):
        """The group's spec for expert_parallel._torch_fast (_fast.torch_fast_module), made once
        torch has been seen, or None where that module is not there or the C calls are not the
        library's (a stand-in's: `entries`, the two C addresses to call instead)."""
        if _fast.tensor_type is _fast.NoTensorYet:
            return _fast.UNMADE
        module = _fast.torch_fast_module()
        if entries is None:
            entries = (_fast.entry_address(self._fn_dispatch_stacked), _fast.entry_address(self._fn_combine_stacked))
        spec = None
        if module is not None and None not in entries:
            d, c = _abi.StackedDispatch, _abi.StackedCombine
            spec = module.spec(_fast.tensor_type, _fast.TORCH_FAST_CODES,
                               self._common, self._common_combine[2], self._common_combine[1], entries, self._group_address,
                               (d.topkIdx.offset, d.tokens.offset, d.direction.offset, d.launchMode.offset, d.phase.offset, d.step.offset),
                               (c.expertOutputs.offset, c.direction.offset, c.launchMode.offset, c.phase.offset, c.step.offset))
            self._fast_dispatch, self._fast_combine = module.dispatch, module.combine
        self._fast_spec = spec
        return spec

    def _common_inputs(self, xs, topk_idx, topk_weights):
        """(B, routing's epDataType_t, addresses) of the common dispatch's inputs: three stacked
        torch tensors ``[R, B, hidden]``, ``[R, B, K]`` int32 or int64 and ``[R, B, K]`` float32,
        of the group's input type, on its device, contiguous; None for anything else."""
        tensor = type(xs)
        if tensor is not _fast.tensor_type:   # look() learns torch's tensor type from the first tensor it sees
            if (_fast.tensor_type is not _fast.NoTensorYet or tensor.__name__ != "Tensor" or _fast.look(xs, ()) is None
                    or tensor is not _fast.tensor_type):
                return None
        if type(topk_idx) is not tensor or type(topk_weights) is not tensor:
            return None
        try:   # every property the call depends on, read once (each read costs a torch call)
            seen = (xs.shape, topk_idx.shape, topk_weights.shape, xs.dtype, topk_idx.dtype, topk_weights.dtype,
                    xs.get_device(), topk_idx.get_device(), topk_weights.get_device(),
                    xs.is_contiguous(), topk_idx.is_contiguous(), topk_weights.is_contiguous())
            pointers = xs.data_ptr(), topk_idx.data_ptr(), topk_weights.data_ptr()
        except RuntimeError:   # a sparse or nested tensor (no sizes or strides), a torch.func wrapper (no memory): the general path names it
            return None
        accepted = self._common_seen
        if seen != accepted[0]:   # (one comparison when they are the last call's: a decode loop's)
            accepted = self._common_signature(seen)
            if accepted is None:
                return None
        # A meta tensor (get_device() -1, as the CPU's) has no memory, a negative view or a shrunk
        # storage not the values (_fast.sound): the general path names them, and takes rows off an
        # 8-byte boundary (_off_boundary).
        if not (pointers[0] and pointers[1] and pointers[2]) or pointers[0] & 7:
            return None
        # _fast.sound of the three, in line: no negative view, each storage holding the tensor's bytes.
        if xs.is_neg() or topk_idx.is_neg() or topk_weights.is_neg():
            return None
        sizes, sx, si, sw = accepted[3], xs.untyped_storage(), topk_idx.untyped_storage(), topk_weights.untyped_storage()
        if (pointers[0] + sizes[0] > sx.data_ptr() + len(sx) or pointers[1] + sizes[1] > si.data_ptr() + len(si)
                or pointers[2] + sizes[2] > sw.data_ptr() + len(sw)):
            return None
        return accepted[1], accepted[2], pointers

    def _common_signature(self, seen):
        """(seen, B, routing's epDataType_t) when `seen` (_dispatch_common's reads: shapes, dtypes,
        devices and contiguity of xs, topk_idx, topk_weights) is a common dispatch's: ``[R, B,
        hidden]`` of the group's input type, ``[R, B, K]`` int32 or int64 and ``[R, B, K]`` float32,
        on its device, contiguous; kept as the one the next call compares with. None for anything else."""
        ranks, hidden, max_tokens, top_k, element, device = self._common
        xsz, isz, wsz, x_type, idx_type, w_type, x_device, idx_device, w_device, x_fine, idx_fine, w_fine = seen
        codes = _fast.torch_codes
        if len(xsz) != 3 or len(isz) != 3:
            return None
        b = xsz[1]
        ic = codes.get(idx_type)
        if not (xsz[0] == ranks and xsz[2] == hidden and 0 < b <= max_tokens and codes.get(x_type) == element
                and (ic == _abi.I32 or ic == _abi.I64) and codes.get(w_type) == _abi.F32 and isz == wsz
                and isz[0] == ranks and isz[1] == b and isz[2] == top_k
                and x_device == device and idx_device == device and w_device == device and x_fine and idx_fine and w_fine):
            return None
        rows = ranks * b   # (and the three tensors' bytes, which _fast.sound compares with their storages)
        sizes = (rows * hidden * _abi.DTYPE_SIZES[element], rows * top_k * _abi.DTYPE_SIZES[ic], rows * top_k * 4)
        accepted = self._common_seen = (seen, b, ic, sizes)
        return accepted

    def _start_step(self, target):
        """`target`'s bookkeeping as a call that starts a new step on it is made (none of the last
        step's slot, rows or weights)."""
        self._advance_step(target)
        target.tokens = target.slot = None
        target.topk_weights = target.weight_addresses = target.weight_stacked = None

    def _dispatch_call(self, slot):
        """The slot's epStackedDispatch_t, made on first use: its outputs point at the slot's buffers for good."""
        call = slot.dispatch_call = _fast.StackedCall(_abi.StackedDispatch, self._device)
        for name, address, code in slot.stacked_outputs:
            call.set(name, address, code)
        return call

    def _dispatch_stacked(self, parts, xs, topk_idx, topk_weights, handle, direction, direction_value, mode, stream, wait_event,
                          record_event, send_only, caller=None):
        """dispatch() of stacked arguments into the next buffer slot (or `caller`'s stacked
        outputs, from _stacked_dispatch_out): one C call, update included."""
        b, x, idx, w, s = parts
        raw = self._stream_of(stream, wait_event)
        if caller is None:   # (the rotation moves on in _slot_result, once the library took the call)
            slot = self._slot(self._next_slot, xs)
            call = slot.dispatch_call or self._dispatch_call(slot)
        else:
            slot, call = None, self._caller_dispatch_call(caller)
        call.set("inputTokens", x[0], x[1])
        if idx is None:
            call.clear("topkIdx")
        else:
            call.set("topkIdx", idx[0], idx[1])
        if w is None:
            call.clear("topkWeights")
        else:
            call.set("topkWeights", w[0], _abi.F32)
        if s is not None:
            call.set("scales", s[0], s[1])
        target = handle if handle is not None else Handle(self)
        call.fields(b, direction_value, mode, _abi.PHASE_SEND_ONLY if send_only else _abi.PHASE_WHOLE, target._pointer)
        if idx is not None:
            self._start_step(target)
        status = self._fn_dispatch_stacked(self._group_address, call.address, raw)
        if status:
            check_status(status, _errors.DISPATCH_XS, _errors.DISPATCH_SLOT if slot is not None else _errors.DISPATCH_OUT,
                         kind=_arrays.kind(xs))
        self._stacked_taken(target, b, topk_idx, topk_weights, 0 if w is None else w[0], direction)
        if slot is not None:
            return self._slot_result(slot, target, stream, send_only, record_event)
        tokens, received_idx, received_w, counts = caller[1]
        self._caller_taken(target, received_w)
        result = _StackedOutResult((tokens, received_idx, received_w), target, counts)
        return self._dispatch_result(result, send_only, record_event, stream)

    def _stream_of(self, stream, wait_event):
        """A dispatch's CUstream (None on the CPU, whose calls take none), made to wait for
        `wait_event`: either of the wrong kind is named before the call takes a buffer slot or
        starts a step."""
        device = self._device
        raw = None if device == -1 and stream is None else _fast.raw_stream(device, stream)
        if wait_event is not None:
            _fast.wait(device, stream, wait_event)
        return raw

    def _dispatch_fresh(self, xs, topk_idx, topk_weights, handle, direction, out):
        """``dispatch(xs, topk_idx, topk_weights, handle=handle, direction=direction, out=out)`` for
        the torch ops, which read nothing of its result. The op has checked its stacked inputs as
        dispatch() checks them (torch/_ops.py: the group's dtype and device, ``[R, B, ...]`` shapes
        of the group's sizes, B ≤ max_tokens; a backward dispatch's B is its step's) and made them
        contiguous, and `out` is the stacked tuple (tokens, topk_idx, topk_weights[, expert_counts])
        it has just made of the group's shapes and types on its device (`_received`, `_counts`;
        None for the routing of LL expert-major): so only addresses are read here, and the call's
        arguments are written at once. The handle is checked as dispatch() checks it. Anything
        else takes dispatch() itself, which names what is wrong: a pending send-only call, a
        closed group, a call without the weights a layout sends with the rows or without routing
        for a step that has none (a direct call of the op); B = 0 (empty arrays have no address)
        and rows off an 8-byte boundary on the CPU (_off_boundary) take its per-rank path."""
        lock = self._lock
        lock.acquire()
        try:
            if (self._open_send_only is None and self._group and (topk_weights is not None or self.recv_routing_shape is None)
                    and (topk_idx is not None or handle.tokens is not None)):
                self._check_handle(handle, dispatched=False)
                b, x = xs.shape[-2], xs.data_ptr()
                if topk_idx is None and list(handle.tokens) != [b] * self.ranks:
                    raise InvalidArgumentError(f"xs: {[b] * self.ranks} tokens per rank; the handle's routing has {handle.tokens}")
                if topk_idx is None:
                    check_routing(handle)
                if b and not (x & 7 and self._device == -1):
                    # The call, as _dispatch_stacked makes it into a caller's stacked outputs (one C call,
                    # update included), and its bookkeeping.
                    call = self._caller_dispatch or self._caller_dispatch_made()
                    tokens, idx, weights = out[:3]
                    counts = out[3] if len(out) == 4 else None
                    w = 0 if topk_weights is None else topk_weights.data_ptr()
                    call.caller_dispatch(0 if topk_idx is None else topk_idx.data_ptr(),
                                         0 if topk_idx is None else _fast._torch_dtype_codes()[topk_idx.dtype], x,
                                         self._input_element, w, tokens.data_ptr(), self._element,
                                         0 if idx is None else idx.data_ptr(), 0 if weights is None else weights.data_ptr(),
                                         0 if counts is None else counts.data_ptr(), b, _abi.DIRECTIONS[direction], handle._pointer)
                    if topk_idx is not None:
                        self._start_step(handle)
                    status = self._fn_dispatch_stacked(self._group_address, call.address,
                                                       None if self._device == -1 else _fast.raw_stream(self._device))
                    if status:
                        check_status(status, _errors.DISPATCH_XS, _errors.DISPATCH_OUT, kind=_arrays.kind(xs))
                    self._stacked_taken(handle, b, topk_idx, topk_weights, w, direction)
                    self._caller_taken(handle, weights)
                    return
            self.dispatch(xs, topk_idx, topk_weights, handle=handle, direction=direction, out=out)
        finally:
            lock.release()

    def _stacked_taken(self, target, b, topk_idx, topk_weights, weights_address, direction):
        """What `target` records of a stacked dispatch the library took: a new step's tokens and
        routing, and a forward dispatch's weights (address 0: none), which combine reads again."""
        if topk_idx is not None:
            target.tokens = [b] * self.ranks
            target.topk_idx, target.routing_at = topk_idx, routing_at(topk_idx)
        if direction == "forward" and weights_address:
            target.topk_weights = topk_weights
            target.weight_addresses = None
            target.weight_stacked = weights_address

    @staticmethod
    def _caller_taken(target, received_weights):
        """What `target` records of a dispatch into the caller's stacked outputs: no buffer slot,
        and the caller's received weights (HT expert-major's per-slot weights, which combine reads)."""
        target.slot = -1
        target.received_weights = received_weights

    def _stacked_dispatch_out(self, out):
        """((addresses), (arrays)) of tokens, topk_idx, topk_weights and expert_counts (address 0,
        array None: not given) of a stacked ``out=(tokens [R, *recv_shape], topk_idx, topk_weights[,
        expert_counts [R, L] int32])`` (the routing ``[R, *recv_routing_shape]`` int32 / float32
        where the layout receives it, else None), checked; None when `out` is not of that form
        (per-rank lists; FP8 groups, whose received scales come too): the per-rank path takes
        it, and names what is wrong."""
        if type(out) is not tuple and type(out) is not list or len(out) not in (3, 4) or self.recv_scales_shape is not None:
            return None
        tokens, idx, weights = out[:3]
        counts = out[3] if len(out) == 4 else None
        seen_counts = None if counts is None else _fast.look(counts, _I32_TYPES)
        if counts is not None and seen_counts is None:
            return None
        seen_tokens = _fast.look(tokens, self._types_element)
        if seen_tokens is None:
            return None
        routing, device = self.recv_routing_shape, self._device
        if (routing is None) != (idx is None and weights is None):
            return None
        if routing is not None:
            seen_idx, seen_weights = _fast.look(idx, _INDEX_TYPES), _fast.look(weights, _F32_TYPES)
            if seen_idx is None or seen_weights is None:
                return None
        r = self.ranks
        address = _fast.check(tokens, "out tokens", self._types_element, device, (r,) + tuple(self.recv_shape), seen_tokens, output=True)[0]
        if address & 7 and device == -1:   # rows off an 8-byte boundary: _off_boundary
            return None
        addresses = [address, 0, 0]
        if routing is not None:
            shape = (r,) + tuple(routing)
            addresses[1] = _fast.check(idx, "out topk_idx", _I32_TYPES, device, shape, seen_idx, output=True)[0]
            addresses[2] = _fast.check(weights, "out topk_weights", _F32_TYPES, device, shape, seen_weights, output=True)[0]
        addresses.append(0 if counts is None else
                         _fast.check(counts, "out expert_counts", _I32_TYPES, device, (r, self.local_experts), seen_counts, output=True)[0])
        if device != -1 and _arrays.kind(tokens) != "torch":
            raise InvalidArgumentError("out tokens: a NumPy array; a GPU group takes CUDA torch tensors")
        return tuple(addresses), (tokens, idx, weights, counts)

    def _caller_dispatch_made(self):
        """The group's epStackedDispatch_t for dispatches into the caller's stacked outputs, made
        on first use: no source counts, no scales."""
        call = self._caller_dispatch = _fast.StackedCall(_abi.StackedDispatch, self._device)
        for name in ("receivedScales", "expertSourceCounts"):
            call.clear(name)
        return call

    def _caller_dispatch_call(self, caller):
        """The group's epStackedDispatch_t for dispatches into the caller's stacked outputs,
        pointed at `caller`'s (_stacked_dispatch_out)."""
        call = self._caller_dispatch or self._caller_dispatch_made()
        tokens, idx, weights, counts = caller[0]
        call.set("receivedTokens", tokens, self._element)
        call.set("receivedTopkIdx", idx, _abi.I32 if idx else 0)
        call.set("receivedTopkWeights", weights, _abi.F32 if weights else 0)
        call.set("expertCounts", counts, _abi.I32 if counts else 0)
        return call

    def _combine_common(self, expert_outputs, handle, stream, wait_event, record_event, send_only):
        """combine() of the common call, in line: one stacked tensor ``[R, *recv_shape]`` of the
        group's type on its device, forward, one launch, into the slot of a live handle whose
        dispatch was stacked (an HT expert-major padded group: never), the overlap arguments as
        combine() takes them. None when the call is anything else: the general path takes it
        (and names what is wrong)."""
        if (type(expert_outputs) is not _fast.tensor_type or not isinstance(handle, Handle) or handle.group is not self
                or handle.released or not self._group or (handle._pointer is None and handle.step != self._own_step)):
            return None
        index = handle.slot
        if index is None or index < 0:
            return None
        slot = self._slots[index]
        forward_ll, shape, element, device, kind = self._common_combine
        weights = handle.weight_stacked if forward_ll else None
        # (LL reads the dispatch's weights again below, where they are now; weights that are not
        # a plain tensor, such as a subclass or a Parameter, the general path reads again)
        if (slot is None or slot.kind is not type(expert_outputs)
                or (forward_ll and (not weights or type(handle.topk_weights) is not _fast.tensor_type))
                or _moved(handle)):   # (its routing moved since: the general path names it)
            return None
        spec = self._fast_spec
        if spec is _fast.UNMADE:   # (a loop of handles of its own makes it here: their dispatches never do)
            spec = self._fast_spec_made()
        if (spec is not None and stream is None and wait_event is None and record_event is False and send_only is False
                and slot.combine_kind == kind):
            # The decode loop's combine, its tensors read in C++ (_torch_fast.combine: the checks
            # below; None for anything else, nothing written).
            kept = handle.topk_weights if forward_ll else None
            call, step = slot.combine_call, handle._pointer   # (a ctypes c_void_p of a handle of its own; None: the group's step)
            status = self._fast_combine(spec, expert_outputs, kept, weights, handle.tokens[0], call.address,
                                        None if device == -1 else _fast.raw_stream(device), _abi.PHASE_WHOLE,
                                        None if step is None else step.value)
            if status is not None:
                call._call = call._fields = None   # (as the dispatch's)
                call._set.clear()
                if status:
                    check_status(status, _errors.COMBINE_SLOT, kind="torch")
                return slot.combined_rows(handle.tokens)
        if forward_ll:   # (the dispatch's weights, read again where they are now)
            kept = handle.topk_weights
            weights = kept.data_ptr()
            if (weights != handle.weight_stacked or kept.shape != (self.ranks, handle.tokens[0], self.top_k)
                    or _fast.torch_codes.get(kept.dtype) != _abi.F32 or not kept.is_contiguous() or not _fast.sound(kept, weights)):
                return None   # (moved, reshaped, retyped, negated or shrunk since the dispatch: the general path reads them there, or names them)
        try:
            seen = (expert_outputs.shape, expert_outputs.dtype, expert_outputs.get_device(), expert_outputs.is_contiguous())
            address = expert_outputs.data_ptr()
        except RuntimeError:   # a sparse or nested tensor (no sizes or strides), a torch.func wrapper (no memory): the general path names it
            return None
        if seen != self._combine_seen:   # (one comparison when they are the last call's)
            if not (seen[0] == shape and _fast.torch_codes.get(seen[1]) == element and seen[2] == device and seen[3]):
                return None
            self._combine_seen = seen
        if not address or address & 7 or not _fast.sound(expert_outputs, address):
            return None   # a meta tensor (get_device() -1, as the CPU's), rows off an 8-byte boundary, not the values: the general path
        combined = slot.combined_rows(handle.tokens)
        call = slot.combine_call if slot.combine_kind == kind else self._combine_call(slot, kind)
        call.combine_arguments(address, element, weights, _abi.PHASE_SEND_ONLY if send_only else _abi.PHASE_WHOLE, handle._pointer)
        if wait_event is not None:
            _fast.wait(device, stream, wait_event)
        status = self._fn_combine_stacked(self._group_address, call.address,
                                          None if device == -1 and stream is None else _fast.raw_stream(device, stream))
        if status:
            check_status(status, _errors.COMBINE_SLOT, kind="torch")
        return self._combine_result(combined, send_only, record_event, stream) if send_only or record_event else combined

    def _combine_call(self, slot, fixed):
        """The slot's epStackedCombine_t (made on first use), its fields that depend only on the
        slot and the kind of call, `fixed` = (forward LL expert-major, forward HT padded,
        backward HT), written for that kind."""
        call = slot.combine_call
        if call is None:
            call = slot.combine_call = _fast.StackedCall(_abi.StackedCombine, self._device)
        if fixed != slot.combine_kind:
            forward_ll, padded_forward, backward_ht = fixed
            row_bytes = self.hidden * _abi.DTYPE_SIZES[self._element]
            call.set("combinedTokens", slot.stacked_address("combined"), self._element, self.max_tokens * row_bytes)
            if backward_ht:
                call.set("topkWeightGradients", slot.stacked_address("weight_grads"), _abi.F32, self.max_tokens * self.top_k * 4)
            else:
                call.clear("topkWeightGradients")
                call.clear("weightGradients")
            if padded_forward:
                call.set("topkWeights", slot.stacked_address("topk_weights"), _abi.F32)
            elif not forward_ll:
                call.clear("topkWeights")
            slot.combine_kind = fixed
        return call

    def _combine_stacked(self, expert_outputs, handle, direction, direction_value, mode, backward_ht, weight_gradients, stream,
                         wait_event, record_event, send_only, topk_weights, caller=None):
        """combine() of a stacked expert-output array into the handle's slot (or `caller`'s
        stacked outputs, from _stacked_combine_out); None when an argument is a list, or the
        weights applied are (the per-rank path takes those)."""
        if not handle.tokens[0]:   # empty arrays have no address, which the stacked calls read as "not given"
            return None
        forward_ll = direction == "forward" and self.layout == "expert_major"
        weights = None
        if forward_ll:
            if topk_weights is None:
                if handle.weight_stacked is None:
                    return None
                _kept_weights(handle)   # (where they are now; named where their storage was shrunk)
                weights = handle.weight_stacked
            else:
                tokens = handle.tokens
                if tokens.count(tokens[0]) != len(tokens):
                    return None
                w = self._stacked(topk_weights, "topk_weights", _F32_TYPES, self._tail_k, tokens[0])
                if w is None:
                    return None
                weights = w[0]
        if backward_ht and isinstance(weight_gradients, (list, tuple)):
            return None
        recv = self.recv_shape
        y = self._stacked(expert_outputs, "expert_outputs", self._types_element, recv[1:], recv[0])
        if y is None or y[0] & 7 and self._device == -1:   # (rows off an 8-byte boundary: _off_boundary)
            return None
        g = None
        if backward_ht:
            routing = self.recv_routing_shape
            g = self._stacked(weight_gradients, "weight_gradients", _F32_TYPES, routing[1:], routing[0])
            if g is None:
                return None
        padded_forward = direction == "forward" and self.layout == "expert_major_padded"
        if caller is None:
            slot = self._slots[handle.slot]
            if slot is None or slot.kind is not type(expert_outputs):   # (the other kind: the general path's own arrays)
                return None
            if padded_forward:
                self._require_slot(slot, handle)   # the per-slot weights are the slot's: a later dispatch into it rewrote them
            combined, grads = slot.combine_targets(handle.tokens, backward_ht)
            call = self._combine_call(slot, (forward_ll, padded_forward, backward_ht))
        else:
            padded_weights = 0
            if padded_forward:
                padded_weights = self._padded_weights(handle)
                if padded_weights is None:
                    return None
            call = self._caller_combine_call(caller, forward_ll, padded_weights, backward_ht)
            combined, grads = caller[3]
        call.set("expertOutputs", y[0], y[1])
        if forward_ll:
            call.set("topkWeights", weights, _abi.F32)
        if g is not None:
            call.set("weightGradients", g[0], _abi.F32)
        call.fields(None, direction_value, mode, _abi.PHASE_SEND_ONLY if send_only else _abi.PHASE_WHOLE, handle._pointer)
        raw = _fast.raw_stream(self._device, stream)
        if wait_event is not None:
            _fast.wait(self._device, stream, wait_event)
        status = self._fn_combine_stacked(self._group_address, call.address, raw)
        if status:
            check_status(status, _errors.COMBINE_SLOT if caller is None else _errors.COMBINE_OUT, kind=_arrays.kind(expert_outputs))
        result: Any = (combined, grads) if backward_ht else combined
        return self._combine_result(result, send_only, record_event, stream)

    def _combine_fresh(self, expert_outputs, handle, out, direction="forward", topk_weights=None, weight_gradients=None):
        """``combine(expert_outputs, handle, direction=direction, out=out, topk_weights=topk_weights,
        weight_gradients=weight_gradients)`` for the torch ops, which read nothing of its result.
        The op has checked its stacked inputs as combine() checks them (torch/_ops.py: expert
        outputs ``[R, *recv_shape]`` of the group's dtype on its device, contiguous; LL
        expert-major's topk_weights and HT's weight gradients float32 of their shapes, contiguous),
        and `out` is the stacked ``[R, B, hidden]`` tensor (backward HT: with the ``[R, B, top_k]``
        float32 weight gradients, as a pair) it has just made for the step's B: so only addresses
        are read here (`_fresh_combine_arguments`), and the call's arguments are written at once.
        The handle is checked as combine() checks it. Anything else takes combine() itself, which
        names what is wrong: a pending send-only call, a closed group; B = 0 or ranks of different
        B, and rows off an 8-byte boundary on the CPU (_off_boundary), take its per-rank path."""
        lock = self._lock
        lock.acquire()
        try:
            if self._open_send_only is None and self._group:
                self._check_handle(handle, dispatched=True)
                check_routing(handle)
                tokens = handle.tokens
                b, y = tokens[0], expert_outputs.data_ptr()
                if b and tokens.count(b) == len(tokens) and not (y & 7 and self._device == -1):
                    arguments = self._fresh_combine_arguments(handle, direction, out, topk_weights, weight_gradients, b)
                    if arguments is not None:
                        call = self._caller_combine or self._caller_combine_made()
                        call.caller_combine(y, self._element, *arguments, _abi.DIRECTIONS[direction], handle._pointer)
                        raw = None if self._device == -1 else _fast.raw_stream(self._device)
                        status = self._fn_combine_stacked(self._group_address, call.address, raw)
                        if status:
                            check_status(status, _errors.COMBINE_OUT, kind=_arrays.kind(expert_outputs))
                        return
            self.combine(expert_outputs, handle, direction=direction, weight_gradients=weight_gradients, out=out,
                         topk_weights=topk_weights)
        finally:
            lock.release()

    def _padded_weights(self, handle):
        """The address of the per-slot weights an HT expert-major step's dispatch received: its
        buffer slot's (refused by name where a later dispatch into the slot rewrote them), or the
        caller's stacked float32 array; None where they are not one such array (the per-rank path
        takes the call)."""
        if handle.slot >= 0:
            slot = self._slots[handle.slot]
            self._require_slot(slot, handle)
            return slot.stacked_address("topk_weights")
        weights = handle.received_weights
        seen = _fast.look(weights, _F32_TYPES)
        if seen is None or (type(weights) is _fast.tensor_type and not _fast.sound(weights, seen[0])):
            return None   # (the per-rank path names weights whose storage was shrunk since)
        return seen[0]

    def _fresh_combine_arguments(self, handle, direction, out, topk_weights, weight_gradients, b):
        """_combine_fresh's arguments from the weights on (`_fast.StackedCall.caller_combine`:
        addresses, 0 where none, and the outputs' rank strides), or None where combine() takes
        the call: LL expert-major's weights given to neither call, or of another B than the
        step's; outputs of another B; HT expert-major's per-slot weights not an array."""
        weights = gradients = 0
        combined, grads = out, None
        if direction == "backward":
            if self.algorithm == "ht":
                combined, grads = out
                if weight_gradients is None:
                    return None
                gradients = weight_gradients.data_ptr()
        elif self.layout == "expert_major":   # the dispatch's weights, or those given here
            if topk_weights is None:
                if handle.weight_stacked is None:
                    return None
                _kept_weights(handle)   # (where they are now; named where their storage was shrunk: as _combine_stacked)
                weights = handle.weight_stacked
            elif topk_weights.shape[-2] == b:
                weights = topk_weights.data_ptr()
            if not weights:
                return None
        elif self.layout == "expert_major_padded":
            weights = self._padded_weights(handle)
            if weights is None:
                return None
        if combined.shape[-2] != b:
            return None
        if grads is None:
            return weights, gradients, combined.data_ptr(), b * self._row_bytes, 0, 0
        return weights, gradients, combined.data_ptr(), b * self._row_bytes, grads.data_ptr(), b * self.top_k * 4

    def _stacked_combine_out(self, out, tokens, backward_ht):
        """(combined tokens address, weight gradients address (0: none), B, the result: per-rank
        views of them) of a stacked ``out=``: one ``[R, B, hidden]`` array (backward HT: with
        ``[R, B, top_k]`` float32 weight gradients, as a pair), checked; None when `out` is not of
        that form (per-rank lists; ranks of different token counts): the per-rank path takes it."""
        b = tokens[0]
        if tokens.count(b) != len(tokens):
            return None
        combined, grads = out, None
        if backward_ht:
            if type(out) is not tuple and type(out) is not list or len(out) != 2:
                return None
            combined, grads = out
            seen_grads = _fast.look(grads, _F32_TYPES)
            if seen_grads is None:
                return None
        seen = _fast.look(combined, self._types_element)
        if seen is None:
            return None
        r, device = self.ranks, self._device
        address = _fast.check(combined, "out", self._types_element, device, (r, b, self.hidden), seen, output=True)[0]
        if address & 7 and device == -1:   # rows off an 8-byte boundary: _off_boundary
            return None
        grads_address = 0 if grads is None else _fast.check(grads, "out gradients", _F32_TYPES, device, (r, b, self.top_k), seen_grads, output=True)[0]
        if device != -1 and _arrays.kind(combined) != "torch":
            raise InvalidArgumentError("out: a NumPy array; a GPU group takes CUDA torch tensors")
        return address, grads_address, b, (list(combined), None if grads is None else list(grads))

    def _caller_combine_made(self):
        """The group's epStackedCombine_t for combines into the caller's stacked outputs, made on
        first use."""
        call = self._caller_combine = _fast.StackedCall(_abi.StackedCombine, self._device)
        return call

    def _caller_combine_call(self, caller, forward_ll, padded_weights, backward_ht):
        """The group's epStackedCombine_t for combines into the caller's stacked outputs, pointed
        at `caller`'s and, for HT expert-major padded, `padded_weights`."""
        call = self._caller_combine or self._caller_combine_made()
        address, grads_address, b, _ = caller
        call.set("combinedTokens", address, self._element, b * self._row_bytes)
        if backward_ht:
            call.set("topkWeightGradients", grads_address, _abi.F32, b * self.top_k * 4)
        else:
            call.clear("topkWeightGradients")
            call.clear("weightGradients")
        if padded_weights:
            call.set("topkWeights", padded_weights, _abi.F32)
        elif not forward_ll:
            call.clear("topkWeights")
        return call

    # -- helpers -----------------------------------------------------------------------------

    def _rows(self, values, name, expected, tail, descriptors, tokens):
        """Points `descriptors` at `values` (a list of R arrays ``[B_r, *tail]`` or one stacked
        ``[R, B, *tail]`` array), checked; `tokens`: the expected B_r (None: any ≤ max_tokens).
        Returns (B_r list, an array to make outputs like)."""
        r, device = self.ranks, self._device
        tail = tuple(tail) if isinstance(tail, tuple) else (tail,)
        seen = _fast.look(values, expected)
        if seen is not None:   # one stacked array
            rows = None if tokens is None else tokens[0]
            if tokens is not None and tokens.count(rows) != len(tokens):
                raise InvalidArgumentError(f"{name}: one stacked array, but the ranks' token counts differ ({tokens}); pass a list")
            address, code, sizes = _fast.check(values, name, expected, device, (r, rows) + tail, seen)
            b = int(sizes[1])
            if tokens is None and b > self.max_tokens:
                raise InvalidArgumentError(f"{name}: {b} tokens per rank; must be ≤ max_tokens ({self.max_tokens})")
            if device != -1 and _arrays.kind(values) != "torch":
                raise InvalidArgumentError(f"{name}: a NumPy array; a GPU group takes CUDA torch tensors")
            descriptors.set_all(address, b, code, _abi.DTYPE_SIZES[code])
            return [b] * r, values
        if _arrays.kind(values) is None and not isinstance(values, (list, tuple)):
            try:
                values = list(values)
            except TypeError:
                raise InvalidArgumentError(
                    f"{name}: a {type(values).__name__}; must be a list of {r} per-rank arrays or one [R, ...] array") from None
        if len(values) != r:
            raise InvalidArgumentError(f"{name}: {len(values)} entries; must be one per rank ({r})")
        counts, first_kind, tensor = [], None, _fast.tensor_type
        for i, value in enumerate(values):
            kind = "torch" if type(value) is tensor and value is not None else _arrays.kind(value)
            if kind is None:
                raise InvalidArgumentError(f"{name}[{i}]: a {type(value).__name__}; must be a NumPy array or a PyTorch tensor")
            if first_kind is None:
                first_kind = kind
            elif kind != first_kind:
                raise InvalidArgumentError(f"{name}[{i}]: a {kind} value among {first_kind} values; use one kind")
            if device != -1 and kind != "torch":
                raise InvalidArgumentError(f"{name}[{i}]: a NumPy array; a GPU group takes CUDA torch tensors")
            want = None if tokens is None else tokens[i]
            address, code, sizes = _fast.check(value, name, expected, device, (want,) + tail, index=i)
            b = sizes[0]
            if tokens is None and b > self.max_tokens:
                raise InvalidArgumentError(f"{name}[{i}]: {b} tokens; must be ≤ max_tokens ({self.max_tokens})")
            descriptors.set(i, address, b, code)
            counts.append(b)
        return counts, values[0]

    def _require_slot(self, slot, handle):
        # (The same slot object too: a dispatch of the other kind of array replaces the slot's buffers.)
        if slot is None or slot.use != handle.slot_use or handle.received_weights is not slot.w_own:
            raise InvalidUsageError(
                f"handle: its rows were in buffer slot {handle.slot}, which a later dispatch has used since; combine a step "
                f"before {self.buffer_slots} more dispatches (buffer_slots={self.buffer_slots}), or make the group with more slots")

    def _slot(self, index, like):
        """Buffer slot `index` for a dispatch of `like`'s kind of array: the slot's, or fresh
        buffers of that kind, which the dispatch installs (_slot_result) only once the library
        has taken the call: a refused one leaves the step that holds the slot its buffers (an HT
        expert-major padded step's per-slot weights, its use count)."""
        slot = self._slots[index]
        if slot is None or slot.kind is not type(like):
            with _arrays.outside_inference_mode(like):   # (kept for later calls, in any mode)
                slot = Slot(self, index, like)
        return slot

    def _per_rank(self, values, name):
        """`values` if it holds one entry per rank (a list, a tuple or an [R, ...] array), else the
        named error. Only those kinds: a dict or a set of R entries has a len() too (a dict keyed
        by rank ran the call and the result's lists held its keys; another dict or a set failed
        with a bare KeyError or TypeError)."""
        count = None
        if isinstance(values, (list, tuple)) or _arrays.kind(values) is not None:
            try:
                count = len(values)
            except TypeError:   # (a 0-dim array)
                pass
        if count != self.ranks:
            described = f"{count} entries" if count is not None else f"a {type(values).__name__}"
            raise InvalidArgumentError(f"{name}: {described}; must be one tensor per rank ({self.ranks})")
        return values

    def _caller_outputs(self, out):
        """The dispatch outputs for ``out=(tokens, topk_idx, topk_weights[, expert_counts[, scales]])``
        per-rank lists (FP8 groups: e4m3 tokens and the received scales, which they need)."""
        # A tuple or list only: one array [R, ...] would unpack along its first dimension (R of 3 to
        # 5 into tokens, idx, weights, ...) and be named as the wrong thing.
        if type(out) is not tuple and type(out) is not list or not 3 <= len(out) <= 5:
            raise InvalidArgumentError(
                f"out: {_described(out)}; must be a tuple (tokens, topk_idx, topk_weights), optionally then expert_counts "
                "(or None) and, for FP8 groups, scales: each a per-rank list or one [R, ...] array (None for LL "
                "expert-major's routing)")
        tokens, idx, weights, *rest = out
        r = self.ranks
        routing, fp8 = self.recv_routing_shape, self.recv_scales_shape is not None
        received = tokens if _arrays.kind(tokens) is not None else None   # one stacked array: result.received
        tokens = self._per_rank(tokens, "out tokens")
        if routing is not None and idx is not None and weights is not None:
            idx, weights = self._per_rank(idx, "out topk_idx"), self._per_rank(weights, "out topk_weights")
        if routing is None and (idx is not None or weights is not None):   # (as the library refuses outputs.topkIdx)
            raise InvalidArgumentError(f"out topk_{'idx' if idx is not None else 'weights'}: given; must be None: layout "
                                       f"{self.layout!r} receives no routing")
        counts = rest[0] if rest else None
        if counts is not None:
            counts = self._per_rank(counts, "out expert_counts")
        scales = rest[1] if len(rest) > 1 else None
        if fp8 and scales is None:
            raise InvalidArgumentError("out: an FP8 group receives scales beside its e4m3 rows: pass (tokens, topk_idx, "
                                       "topk_weights, expert_counts or None, scales), scales [R, *recv_scales_shape]")
        if not fp8 and scales is not None:
            raise InvalidArgumentError("out scales: given; only FP8 groups receive scales")
        if scales is not None:
            scales = self._per_rank(scales, "out scales")
        element = {_abi.E4M3} if fp8 else {self._element}   # (the received rows' type: e4m3 in an FP8 group)
        keep = []
        outputs = (_abi.DispatchOutputs * r)()
        for i in range(r):
            t = _arrays.tensor(tokens[i], f"out tokens[{i}]", writable=True, dtypes=element, device=self._device, shape=self.recv_shape)
            ti = tw = None
            if routing is not None:
                if idx is None or weights is None:
                    raise InvalidArgumentError(f"out: layout {self.layout!r} receives topk_idx and topk_weights too")
                ti = _arrays.tensor(idx[i], f"out topk_idx[{i}]", writable=True, dtypes={_abi.I32}, device=self._device, shape=routing)
                tw = _arrays.tensor(weights[i], f"out topk_weights[{i}]", writable=True, dtypes={_abi.F32}, device=self._device, shape=routing)
            tc = None if counts is None else _arrays.tensor(counts[i], f"out expert_counts[{i}]", writable=True, dtypes={_abi.I32},
                                                            device=self._device, shape=(self.local_experts,))
            ts = None if scales is None else _arrays.tensor(scales[i], f"out scales[{i}]", writable=True, dtypes={self._scale_type},
                                                            device=self._device, shape=self.recv_scales_shape)
            keep += [t, ti, tw, tc, ts]
            outputs[i] = _abi.new(_abi.DispatchOutputs, tokens=ctypes.pointer(t), topkIdx=_arrays.pointer(ti),
                                  topkWeights=_arrays.pointer(tw), expertCounts=_arrays.pointer(tc), scales=_arrays.pointer(ts))
        self._keep = keep
        return outputs, (list(tokens), None if routing is None else list(idx), None if routing is None else list(weights), counts,
                         received, None if scales is None else list(scales))

    def _caller_combine_outputs(self, out, tokens, backward_ht):
        r = self.ranks
        if backward_ht:
            combined, grads = _backward_out(out, r)
        else:
            combined, grads = out, None
        combined = self._per_rank(combined, "out")
        if grads is not None:
            grads = self._per_rank(grads, "out gradients")
        keep = []
        outputs = (_abi.CombineOutputs * r)()
        for i in range(r):
            t = _arrays.tensor(combined[i], f"out[{i}]", writable=True, dtypes={self._element}, device=self._device, shape=(tokens[i], self.hidden))
            g = None if grads is None else _arrays.tensor(grads[i], f"out gradients[{i}]", writable=True, dtypes={_abi.F32},
                                                          device=self._device, shape=(tokens[i], self.top_k))
            keep += [t, g]
            outputs[i] = _abi.new(_abi.CombineOutputs, tokens=ctypes.pointer(t), topkWeightGradients=_arrays.pointer(g))
        self._keep = keep
        return outputs, list(combined), None if grads is None else list(grads)

    @locked
    def _layout_of(self, handle):
        self._check_handle(handle, dispatched=True)
        infos = []
        # Every rank from the library, which knows the step's mask: a rank masked since the step's
        # update received its rows (the group's mask now would say nothing), and one masked at the
        # update reads all zeros.
        for r in range(self.ranks):
            buffers = _LayoutBuffers(self.local_experts, self.ranks)
            if handle.own:
                call("epStepGetLayoutInfo", handle._pointer, r, ctypes.byref(buffers.struct))
            else:
                call("epGroupGetLayoutInfo", self._group, r, ctypes.byref(buffers.struct))
            infos.append(buffers.value())
        return infos
