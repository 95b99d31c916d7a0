"""NCCLGroup: this process's rank of a group whose ranks are processes, one GPU each, joined by
NCCL (a multi-GPU job started by torchrun, mpirun or a launcher of your own)."""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any, List, Optional, Tuple, Union

from . import _abi, _arrays, _config, _fast, errors
from ._nccl_slots import NCCLSlot
from ._group_base import NO_COMBINE_WEIGHTS, GroupBase, combine_weights_refused, locked
from ._library import addresses_entry, call, check_status, load
from ._types import Algorithm, Array, Device, Direction, DType, Layout, Overflow, Seconds
from .errors import ExpertParallelError, InvalidArgumentError, InvalidUsageError
from ._results import DispatchResult, Handle, _LayoutBuffers, check_routing, routing_at
from ._results import moved as _moved


_FORWARD = "forward"
_ROUTING_TYPES, _F32_TYPES = frozenset({_abi.I32, _abi.I64}), frozenset({_abi.F32})


def nccl_unique_id() -> bytes:
    """A fresh NCCL unique id (128 bytes): rank 0 makes one per group and gives it to every rank."""
    load()
    value = _abi.NCCLUniqueId()
    call("epGetNCCLUniqueId", ctypes.byref(value))
    return bytes(value.bytes)


def _share_unique_id(dist, process_group, rank):
    """Rank 0 of `process_group` makes the id and broadcasts it; when it cannot, it broadcasts its
    error instead, so that every rank raises it rather than waiting for the others."""
    message = [None]
    if rank == 0:
        try:
            message[0] = ("id", nccl_unique_id())
        except ExpertParallelError as error:
            message[0] = ("error", type(error).__name__, str(error), error.status)
    dist.broadcast_object_list(message, src=dist.get_global_rank(process_group, 0), group=process_group)
    if message[0][0] == "error":
        _, name, text, status = message[0]
        cls = getattr(errors, name, ExpertParallelError)
        if not (isinstance(cls, type) and issubclass(cls, ExpertParallelError)):
            cls = ExpertParallelError
        # (One argument: cls(message, status) read as the tuple "('rank 0 could not ...', 8)".)
        error = cls(f"rank 0 could not make the NCCL unique id: {text}")
        if error.status != status:
            error.status, error.status_name = status, errors._STATUS_NAMES.get(status, f"epResult_t {status}")
        raise error
    return message[0][1]


def _cuda_ordinal(device):
    """The CUDA ordinal of `device`: an int, "cuda", "cuda:N", a torch.device, or None (PyTorch's
    current device)."""
    if device is None or str(device) == "cuda":
        try:
            import torch
        except ImportError:
            if device is None:
                raise InvalidArgumentError("device=None; finding the current CUDA device needs PyTorch: pass device=N")
            return 0
        # A PyTorch without CUDA (or without a GPU) has no current device: device 0, whose absence
        # the library names (CudaError / NcclError), as it does for device=0.
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    if isinstance(device, int) and not isinstance(device, bool):
        return _config.integer(device, "device", 0, _config.INT32)
    text = str(device)
    ordinal = _config.cuda_ordinal(device, text)
    if ordinal is not None:
        return ordinal
    raise InvalidArgumentError(f"device={device!r}; must be a CUDA device: N, 'cuda' or 'cuda:N'")


class NCCLGroup(GroupBase):
    """This process's rank of a group of ``ranks`` processes, one GPU each, joined by an NCCL
    communicator the library makes from ``unique_id`` (:func:`nccl_unique_id` on rank 0, handed to
    every rank). Every rank creates its group at the same time, with the same settings; the call
    returns once all have joined. :meth:`from_process_group` does it all from a torch.distributed
    process group.

    Tensors are CUDA torch tensors on ``device``; calls run on its current CUDA stream and return
    without waiting. Settings as for :class:`VirtualGroup`, one rank's view: :meth:`dispatch` takes
    this rank's ``x``, ``topk_idx`` and ``topk_weights`` and returns this rank's received tensors
    (the group's own receive buffers of a buffer slot, which the other ranks wrote: no copy; int32
    ``topk_idx``); :meth:`combine` returns this rank's combined tokens. The calls' argument blocks
    are made once and patched per call. Every rank makes the same calls in the
    same order. ``init_timeout``: seconds to wait for every rank to join. ``fp8``, ``fp8_source``:
    FP8 dispatch as for :class:`VirtualGroup` (rows arrive as e4m3 in the slot's receive buffer,
    their scales in ``result.scales``; combine stays in ``dtype``).
    """

    rank: int

    def __init__(self, experts: int, hidden: int, top_k: int, max_tokens: int, *, rank: int, ranks: int,
                 unique_id: bytes, device: Device = None, algorithm: Algorithm = "ll", layout: Optional[Layout] = None,
                 alignment: int = 1, dtype: DType = "bf16", max_recv_tokens: Optional[int] = None,
                 overflow: Overflow = "fail", timeout: Seconds = 10.0, init_timeout: Seconds = 60.0,
                 multiprocessors: Optional[int] = None, tuning: Optional[dict] = None, fp8: Optional[str] = None,
                 fp8_source: str = "quantize") -> None:
        load()
        self._group = self._handle = None
        config, self._element = _config.group_config(
            ranks=ranks, experts=experts, hidden=hidden, top_k=top_k, max_tokens=max_tokens, algorithm=algorithm,
            layout=layout, alignment=alignment, dtype=dtype, max_recv_tokens=max_recv_tokens, overflow=overflow,
            timeout=timeout, fp8=fp8, fp8_source=fp8_source)
        rank = _config.integer(rank, "rank", 0, _config.INT32)
        if not isinstance(unique_id, (bytes, bytearray)) or len(unique_id) != _abi.NCCL_UNIQUE_ID_BYTES:
            described = f"{len(unique_id)} bytes" if isinstance(unique_id, (bytes, bytearray)) else f"a {type(unique_id).__name__}"
            raise InvalidArgumentError(
                f"unique_id: {described}; must be the {_abi.NCCL_UNIQUE_ID_BYTES} bytes of nccl_unique_id() from rank 0")
        self._device = _cuda_ordinal(device)
        settings = _abi.new(
            _abi.NCCLRankConfig, rank=rank, device=self._device,
            multiprocessors=0 if multiprocessors is None else _config.integer(multiprocessors, "multiprocessors", 1, _config.INT32),
            initTimeoutSeconds=_config.seconds(init_timeout, "init_timeout"), tuning=_config.tuning(tuning))
        ctypes.memmove(settings.uniqueId.bytes, bytes(unique_id), _abi.NCCL_UNIQUE_ID_BYTES)
        group = ctypes.c_void_p()
        call("epGroupCreateNCCL", ctypes.byref(config), ctypes.byref(settings), ctypes.byref(group))
        self._group = group
        handle = ctypes.c_void_p()
        call("epHandleCreate", group, rank, ctypes.byref(handle))
        self._handle = handle
        try:
            _config.describe(self, group, algorithm, self._element)
            _config.check_buffers(self, copies=1)
        except BaseException:
            self.close()
            raise
        self.rank = rank
        self.device = _arrays.describe_device(self._device)
        self._own_step = 0
        self._pending = None  # the handle of an update() whose dispatch has not come yet
        info = _abi.new(_abi.GroupInfo)
        call("epGroupGetInfo", group, ctypes.byref(info))
        self.multiprocessors = info.multiprocessors
        self._next_slot = 0
        try:
            self._slots = self._make_slots(info.bufferSlots)
            self._prepare_calls(addresses_entry)
        except BaseException:
            self.close()
            raise

    def _make_slots(self, count: int) -> List[Any]:
        """The group's `count` buffer slots, their tensors normal ones also under
        torch.inference_mode (the DeepEP adapter makes a group in the first call of a shape, which
        may run under it): later calls outside it update them in place (the adapter's stage, the
        torch ops' per-slot weights and cleared routing)."""
        import torch

        with torch.inference_mode(False):
            return [NCCLSlot(self, s) for s in range(count)]

    @classmethod
    def from_process_group(cls, process_group: Any = None, *, experts: int, hidden: int, top_k: int, max_tokens: int,
                           device: Device = None, **settings: Any) -> "NCCLGroup":
        """This process's rank of a group over the ranks of a torch.distributed process group
        (None: the default group, WORLD): rank = its rank in the group, ranks = the group's size,
        device = PyTorch's current CUDA device unless given. Rank 0 makes the NCCL unique id and
        broadcasts it with ``torch.distributed.broadcast_object_list`` over the process group.
        Collective: every rank of the process group calls it with the same settings."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise InvalidUsageError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
        process_group = process_group if process_group is not None else dist.group.WORLD
        rank, ranks = _config.process_group_place(dist, process_group, "process_group")
        unique_id = _share_unique_id(dist, process_group, rank)
        return cls(experts, hidden, top_k, max_tokens, rank=rank, ranks=ranks, unique_id=unique_id, device=device,
                   **settings)

    # -- lifetime ----------------------------------------------------------------------------

    @locked
    def close(self) -> None:
        """Releases the group and ends its NCCL communicator; every rank closes its group (the
        communicator's end waits, bounded, for the others). Also done when garbage-collected."""
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            call("epHandleDestroy", handle)
        super().close()

    def __repr__(self) -> str:
        return (f"NCCLGroup(rank={getattr(self, 'rank', None)}, ranks={getattr(self, 'ranks', None)}, "
                f"experts={getattr(self, 'experts', None)}, hidden={getattr(self, 'hidden', None)}, "
                f"algorithm={getattr(self, 'algorithm', None)!r}, layout={getattr(self, 'layout', None)!r}, "
                f"dtype={getattr(self, 'dtype', None)!r}, device={getattr(self, 'device', None)!r})")

    # -- the step ----------------------------------------------------------------------------

    @locked
    def update(self, topk_idx: Array, *, handle: Optional[Handle] = None) -> None:
        """Starts a step with this rank's routing: ``[B, top_k]`` int32 or int64 global expert ids
        (-1: none), ``B ≤ max_tokens``. Keep it unchanged until the step's combine. :meth:`dispatch`
        calls it when given ``topk_idx``; call it yourself to start the step earlier."""
        self._check_open()
        if self._open_send_only is not None:
            self._refuse_open()
        if handle is not None:
            self._check_handle(handle, dispatched=False)
        target = handle if handle is not None else Handle(self)
        self._update(topk_idx, self._routing_rows(topk_idx), target, None)
        if handle is None:
            self._pending = target

    def _prepare_calls(self, entry):
        """The data path's argument blocks, made once and patched per call: the update's
        descriptor and structs (update()), and per buffer slot a stacked dispatch (one part: this
        rank's; its received rows, ids, weights, scales and counts the slot's own for good) and a
        stacked combine, with the entry points taking their addresses (`entry`:
        _library.addresses_entry)."""
        device, k = self._device, self.top_k
        recv = self.recv_shape
        self._fn_update = entry("epHandleUpdate")
        self._fn_dispatch_stacked, self._fn_combine_stacked = entry("epGroupDispatchStacked"), entry("epGroupCombineStacked")
        self._fn_copy_received = entry("epGroupCopyReceived")
        self._copy_out = _fast.Descriptors(1, device, self._recv_element, recv[1:])   # (_copy_received's destination)
        self._copy_out_address = ctypes.addressof(self._copy_out.array[0])
        self._handle_address, self._group_address = self._handle.value, self._group.value
        self._idx = _fast.Descriptors(1, device, _abi.I32, (k,))
        self._input_types, self._element_types = {self._input_element}, {self._element}
        self._common_combine = (tuple(recv), self._element, device, self.layout)   # what _combine_common compares
        # What _dispatch_common compares (FP8 pass-through rows come with scales: never the common call).
        self._common = (self.hidden, k, self.max_tokens, -1 if self._input_element == _abi.E4M3 else self._input_element, device,
                        self.recv_routing_shape is not None)
        self._common_seen = (None, 0, 0)   # the last common dispatch's reads, its B and routing type (_common_signature)
        self._scale_types = {self._scale_type}
        self._update_in = _abi.new(_abi.UpdateInputs, topkIdx=self._idx.pointers[0])
        self._update_config = _abi.new(_abi.UpdateConfig)
        self._update_addresses = (ctypes.addressof(self._update_in), ctypes.addressof(self._update_config))
        # An empty tensor's address is 0, which a stacked call reads as "not given": a rank with no
        # tokens passes this one instead (a slot buffer's: aligned, on the device; nothing is read).
        self._empty = self._slots[0].tokens_desc.data
        # expert_parallel._torch_fast's reads of the common calls' tensors where it is built
        # (_fast_spec_made, on the first common call once torch is seen; None: the Python reads).
        self._fast_spec = _fast.UNMADE
        self._fast_inputs = self._fast_address = None
        self._dispatch_calls, self._combine_calls = [], []
        for slot in self._slots:
            dispatch = _fast.StackedCall(_abi.StackedDispatch, device)
            for name, descriptor in (("receivedTokens", slot.tokens_desc), ("receivedTopkIdx", slot.idx_desc),
                                     ("receivedTopkWeights", slot.weights_desc), ("receivedScales", slot.scales_desc),
                                     ("expertCounts", slot.counts_desc), ("expertSourceCounts", slot.source_desc)):
                if descriptor is not None:
                    dispatch.set(name, descriptor.data or 0, descriptor.dtype)
            self._dispatch_calls.append(dispatch)
            self._combine_calls.append(_fast.StackedCall(_abi.StackedCombine, device))
        # Per slot: the combined rows (and weight gradients) of b tokens as views, by (b, backward HT).
        self._combined_views = [{} for _ in self._slots]

    def _copy_received(self, handle, tokens):
        """Copies the rows `handle`'s dispatch received (the layout's zones, padding included)
        out of the buffer slot it used into `tokens`, on the current stream (epGroupCopyReceived);
        rows outside the zones are left as they are. `tokens`: a contiguous torch tensor shaped
        and typed like the slot's received tokens on the group's device (the torch ops make it).
        Under the group's lock, as every call of it: the descriptor is the group's one, which
        another thread's copy would rewrite between the set and the call (the backward pass runs
        on autograd's thread)."""
        with self._lock:
            out = self._copy_out
            out.set(0, tokens.data_ptr(), self.recv_shape[0], self._recv_element)
            check_status(self._fn_copy_received(self._group_address, handle._pointer, self._copy_out_address, self._raw(None)))

    def _routing_rows(self, topk_idx):
        """(B, address, epDataType_t) of `topk_idx`, checked: [B, top_k] int32 or int64, B ≤ max_tokens."""
        self._require_torch(topk_idx, "topk_idx")
        try:
            tokens = int(topk_idx.shape[0]) if len(topk_idx.shape) == 2 else None
        except RuntimeError:   # a nested tensor has no sizes: named
            _arrays.dense(topk_idx, "topk_idx")
            raise
        if tokens is not None and tokens > self.max_tokens:
            raise InvalidArgumentError(f"topk_idx: {tokens} tokens; must be ≤ max_tokens ({self.max_tokens})")
        address, code, sizes = _fast.check(topk_idx, "topk_idx", _ROUTING_TYPES, self._device, (None, self.top_k))
        return sizes[0], address, code

    def _update(self, topk_idx, routing, target, stream):
        """Starts `target`'s step with `topk_idx` (`routing`: what _routing_rows returned)."""
        tokens, address, code = routing
        self._idx.set(0, address, tokens, code)
        self._update_config.step = target._pointer
        self._start_step(target)
        a = self._update_addresses
        check_status(self._fn_update(self._handle_address, a[0], a[1], self._raw(stream)))
        target.tokens, target.topk_idx, target.routing_at = tokens, topk_idx, routing_at(topk_idx)

    def _start_step(self, target):
        """`target`'s bookkeeping as a call that starts a new step on it is made."""
        self._advance_step(target)
        target.tokens = target.slot = target.topk_weights = None   # (a new step: none of the last one's weights)

    def dispatch(self, x: Array, topk_idx: Optional[Array] = None, topk_weights: Optional[Array] = None, *,
                 handle: Optional[Handle] = None, direction: Direction = "forward", stream: Any = None,
                 wait_event: Any = None, record_event: bool = False, send_only: bool = False,
                 scales: Optional[Array] = None) -> DispatchResult:
        """Sends this rank's ``x`` ``[B, hidden]`` to the ranks of its tokens' top-k experts and
        returns what this rank received: a :class:`DispatchResult` whose ``tokens`` (``recv_shape``),
        ``topk_idx`` / ``topk_weights`` (``recv_routing_shape``, int32 ids; None for LL
        expert-major) are the group's own receive buffers of the buffer slot the dispatch used (no
        copy: the other ranks wrote them; rows outside the received zones are unspecified),
        ``expert_counts`` / ``expert_source_counts`` this rank's counts on the device,
        ``expert_outputs`` the slot's buffer to write the expert outputs into for a combine that
        copies nothing, ``layout`` its :class:`LayoutInfo` (read on first use, which waits), and
        ``handle`` what :meth:`combine` needs. ``topk_idx``: as for :meth:`update` (None: the
        routing of the last update, or of ``handle``); ``topk_weights``: ``[B, top_k]`` float32,
        required except for LL expert-major, whose combine needs them instead. ``stream``,
        ``wait_event``, ``record_event``, ``send_only``: as for :meth:`VirtualGroup.dispatch`. FP8
        groups: ``x`` is ``float8_e4m3fn`` with its ``[B, scale words]`` ``scales`` for
        ``fp8_source="pass_through"``, else in ``dtype`` (quantised in the kernel); the received
        scales are ``result.scales``, the slot's own buffer."""
        lock = self._lock   # (the @locked of the other methods, in line: this is the data path; acquire and release
        lock.acquire()      # cost half a with statement on an RLock)
        try:
            if self._open_send_only is not None:   # (as the library refuses it, before this call's bookkeeping)
                self._refuse_open()
            if send_only is not False and send_only is not True or record_event is not False and record_event is not True:
                _config.flags(send_only=send_only, record_event=record_event)
            if topk_idx is not None and scales is None and direction is _FORWARD:
                result = self._dispatch_common(x, topk_idx, topk_weights, handle, stream, wait_event, record_event, send_only)
                if result is not None:
                    return result
            self._check_open()
            direction_value = 0 if direction is _FORWARD else _config.choice(direction, "direction", _abi.DIRECTIONS)
            if handle is not None:
                self._check_handle(handle, dispatched=False)
            target = handle
            idx = None   # (address, type) of new routing: the call starts a step
            if topk_idx is not None:
                b, address, code = self._routing_rows(topk_idx)
                idx, routing = (address or self._empty, code), topk_idx
            elif handle is not None and handle.tokens is not None:
                check_routing(handle)
                routing, b = handle.topk_idx, handle.tokens
            elif handle is None and self._pending is not None and self._pending.step == self._own_step:
                target = self._pending
                check_routing(target)
                routing, b = target.topk_idx, target.tokens
            else:
                raise InvalidUsageError("dispatch: no routing for this step; pass topk_idx or call update first")
            if topk_weights is None and self.recv_routing_shape is not None:
                raise InvalidArgumentError(f"topk_weights: None; layout {self.layout!r} sends the weights with the tokens")
            self._require_torch(x, "x")
            h, k, device = self.hidden, self.top_k, self._device
            empty = self._empty
            x_address = _fast.check(x, "x", self._input_types, device, (b, h))[0] or empty
            self._require_scales(scales)
            scale_words = None
            if scales is not None:
                address, code, _ = _fast.check(scales, "scales", self._scale_types, device, (b, self.recv_scales_shape[-1]))
                scale_words = (address or empty, code)
            weights = 0
            if topk_weights is not None:
                weights = _fast.check(topk_weights, "topk_weights", _F32_TYPES, device, (b, k))[0] or empty
            raw = self._stream_of(stream, wait_event)
            index = self._next_slot
            call = self._dispatch_calls[index]
            call.set("inputTokens", x_address, self._input_element)
            call.set("topkIdx", *idx) if idx else call.clear("topkIdx")
            call.set("topkWeights", weights, _abi.F32)   # (address 0: not given)
            call.set("scales", *scale_words) if scale_words else call.clear("scales")
            call.fields(b, direction_value, 0, _abi.PHASE_SEND_ONLY if send_only else _abi.PHASE_WHOLE,
                        None if target is None else target._pointer)
            return self._send(index, call, target, topk_idx, routing, b, topk_weights, direction_value, raw, stream, record_event,
                              send_only)
        finally:
            lock.release()

    def _stream_of(self, stream, wait_event):
        """A call's CUstream, made to wait for `wait_event`: either of the wrong kind is named
        before anything changes."""
        raw = self._raw(stream)
        if wait_event is not None:
            _fast.wait(self._device, stream, wait_event)
        return raw

    def _send(self, index, call, target, topk_idx, routing, b, topk_weights, direction_value, raw, stream, record_event, send_only):
        """A dispatch whose arguments are checked and written into `call`, buffer slot `index`'s
        stacked dispatch (with `topk_idx`: the step's update too, one call), for `target` (None:
        the group's own step); its result."""
        slot = self._slots[index]
        if target is None:
            target = Handle(self)
        if topk_idx is not None:  # every argument is checked: the step starts
            self._start_step(target)
        status = self._fn_dispatch_stacked(self._group_address, call.address, raw)
        if status:
            check_status(status, errors.DISPATCH_X, errors.DISPATCH_SLOT, kind="torch")
        self._next_slot = (index + 1) % len(self._slots)   # (the rotation moves on once the library took the call)
        if topk_idx is not None:
            target.tokens = b
        if not target.own:   # (the pending update dispatched, or the own step updated again: a dispatch of another step keeps it)
            self._pending = None
        target.slot = index
        target.slot_use = slot.use = slot.use + 1
        target.topk_idx = routing
        if topk_idx is not None:
            target.routing_at = routing_at(routing)
        if direction_value == 0 and topk_weights is not None:   # (a new step's update cleared the last one's)
            target.topk_weights = topk_weights
        target.received_weights = slot.weights
        return self._dispatch_result(DispatchResult._of_rank_slot(slot, target), send_only, record_event, stream)

    def _dispatch_common(self, x, topk_idx, topk_weights, handle, stream, wait_event, record_event, send_only):
        """dispatch() of the common call, in line: forward, new routing, torch tensors of the
        group's types on its device (``x`` ``[B, hidden]``, ``topk_idx`` ``[B, top_k]`` int32 or
        int64, ``topk_weights`` ``[B, top_k]`` float32 or, where the layout allows, None),
        contiguous, no scales. None for anything else: the general path takes it (and names
        what is wrong)."""
        tensor = _fast.tensor_type
        if (type(x) is not tensor or type(topk_idx) is not tensor or (topk_weights is not None and type(topk_weights) is not tensor)
                or not self._group):
            return None
        spec = self._fast_spec
        if spec is _fast.UNMADE:
            spec = self._fast_spec_made()
        # The reads in C++ where _torch_fast is built (the same checks); None: the Python reads below decide.
        got = None if spec is None else self._fast_inputs(spec, x, topk_idx, topk_weights, self._common[5])
        if got is not None:
            b, ic, x_address, idx_address, w_address = got
        else:
            common = self._common_reads(x, topk_idx, topk_weights)
            if common is None:
                return None
            b, ic, x_address, idx_address, w_address = common
        if handle is not None:
            self._check_handle(handle, dispatched=False)
        raw = self._stream_of(stream, wait_event)
        index = self._next_slot
        call = self._dispatch_calls[index]
        # (Scales stay unset: only pass-through groups send them, and their calls are never this one.)
        empty = self._empty
        call.dispatch_arguments(x_address or empty, self._common[3], idx_address or empty, ic, 0 if topk_weights is None else w_address or empty, b,
                                _abi.PHASE_SEND_ONLY if send_only else _abi.PHASE_WHOLE, None if handle is None else handle._pointer)
        return self._send(index, call, handle, topk_idx, topk_idx, b, topk_weights, 0, raw, stream, record_event, send_only)

    def _fast_spec_made(self):
        """The rank's spec for expert_parallel._torch_fast's reads (rank_inputs, address), made once
        torch has been seen, or None where that module is not there."""
        if _fast.tensor_type is _fast.NoTensorYet:
            return _fast.UNMADE
        module = _fast.torch_fast_module()
        spec = None
        if module is not None:
            hidden, top_k, max_tokens, x_code, device, _ = self._common
            # (No C entries: this rank's calls are made from Python, the reads alone in C++.)
            spec = module.spec(_fast.tensor_type, _fast.TORCH_FAST_CODES, (1, hidden, max_tokens, top_k, x_code, device), -1, (1, 1),
                               (0, 0), 0, (0,) * 6, (0,) * 5)
            self._fast_inputs, self._fast_address = module.rank_inputs, module.address
        self._fast_spec = spec
        return spec

    def _common_reads(self, x, topk_idx, topk_weights):
        """(B, routing's epDataType_t, the three addresses (weights 0: None)) of a common
        dispatch's tensors read from Python, or None: the general path takes the call."""
        try:   # every property the call depends on but the addresses, read once (each read costs a torch call)
            seen = (x.shape, topk_idx.shape, x.dtype, topk_idx.dtype, x.get_device(), topk_idx.get_device(), x.is_contiguous(),
                    topk_idx.is_contiguous())
            if topk_weights is not None:
                seen += (topk_weights.shape, topk_weights.dtype, topk_weights.get_device(), topk_weights.is_contiguous())
            x_address, idx_address = x.data_ptr(), topk_idx.data_ptr()
            w_address = 0 if topk_weights is None else topk_weights.data_ptr()
        except RuntimeError:   # a sparse or nested tensor (no sizes or strides), a torch.func wrapper (no memory): the general path names it
            return None
        accepted = self._common_seen
        if seen != accepted[0]:   # (one comparison when they are the last call's: a decode loop's)
            accepted = self._common_signature(seen)
            if accepted is None:
                return None
        _, b, ic = accepted
        if b and not (x_address and idx_address and (topk_weights is None or w_address)):
            return None   # (tokens with no memory: a meta tensor, whose get_device() is the CPU's -1)
        sound = _fast.sound   # (a negative view, a shrunk storage: the general path names it)
        if not (sound(x, x_address) and sound(topk_idx, idx_address) and (topk_weights is None or sound(topk_weights, w_address))):
            return None
        return b, ic, x_address, idx_address, w_address

    def _common_signature(self, seen):
        """(seen, B, routing's epDataType_t) when `seen` (_dispatch_common's reads: shapes, dtypes,
        devices and contiguity of x, topk_idx and, where given, topk_weights) is a common
        dispatch's: ``x`` ``[B, hidden]`` of the group's input type, ``topk_idx`` ``[B, top_k]``
        int32 or int64, ``topk_weights`` ``[B, top_k]`` float32 or, where the layout allows, none;
        on its device, contiguous; kept as the one the next call compares with. None for anything else."""
        hidden, top_k, max_tokens, x_code, device, needs_weights = self._common
        xsz, isz, x_type, idx_type, x_device, idx_device, x_fine, idx_fine = seen[:8]
        if len(xsz) != 2 or len(isz) != 2:
            return None
        codes = _fast.torch_codes
        b, ic = xsz[0], codes.get(idx_type)
        if not (xsz[1] == hidden and b <= max_tokens and isz[0] == b and isz[1] == top_k and codes.get(x_type) == x_code
                and (ic == _abi.I32 or ic == _abi.I64) and x_device == device and idx_device == device and x_fine and idx_fine):
            return None
        if len(seen) == 8:
            if needs_weights:
                return None
        else:
            wsz, w_type, w_device, w_fine = seen[8:]
            if not (wsz == isz and codes.get(w_type) == _abi.F32 and w_device == device and w_fine):
                return None
        accepted = self._common_seen = (seen, b, ic)
        return accepted

    def combine(self, expert_outputs: Array, handle: Handle, *, direction: Direction = "forward",
                weight_gradients: Optional[Array] = None, stream: Any = None, wait_event: Any = None,
                record_event: bool = False, send_only: bool = False, topk_weights: Optional[Array] = None,
                out: Any = None) -> Any:
        """Brings this rank's tokens' expert outputs back from every rank and reduces them in the
        fixed order (the same bits as every backend). ``expert_outputs``: this rank's experts'
        results, shaped like ``dispatch(...).tokens``: ``dispatch(...).expert_outputs`` itself
        (the buffer the other ranks read: nothing is copied) or a tensor of the caller's (its rows
        that the step received copied there on the stream, the other rows neither read nor
        copied). ``handle``: the step's. Returns the ``[B, hidden]`` combined tokens
        (a view of the slot's combined rows, valid until the slot's next combine; or ``out``, a
        ``[B, hidden]`` tensor of the caller's to write them into, with no copy); HT's backward
        pass takes ``weight_gradients`` (shaped like ``dispatch(...).topk_weights``) and returns
        ``(tokens, topk_weight_gradients)`` (``out``: such a pair). ``topk_weights``: the forward
        combine of LL expert-major applies these ``[B, top_k]`` float32 weights instead of those
        given to dispatch (read when the combine reduces: at ``hook()`` for ``send_only``).
        ``stream``, ``wait_event``, ``record_event``, ``send_only``: as for
        :meth:`VirtualGroup.combine`."""
        lock = self._lock   # (the @locked of the other methods, in line: this is the data path; acquire and release
        lock.acquire()      # cost half a with statement on an RLock)
        try:
            if self._open_send_only is not None:   # (as the library refuses it, before this call's bookkeeping)
                self._refuse_open()
            if send_only is not False and send_only is not True or record_event is not False and record_event is not True:
                _config.flags(send_only=send_only, record_event=record_event)
            if send_only:   # its receiving half reads the weights and writes out: keep their memory until complete() has enqueued it
                self._kept = self._send_only_kept(expert_outputs, handle, topk_weights, weight_gradients, out)
            if weight_gradients is None and direction is _FORWARD:
                result = self._combine_common(expert_outputs, handle, topk_weights, out, stream, wait_event, record_event, send_only)
                if result is not None:
                    return result
            self._check_open()
            self._check_handle(handle, dispatched=True)
            check_routing(handle)
            direction_value = 0 if direction is _FORWARD else _config.choice(direction, "direction", _abi.DIRECTIONS)
            backward_ht = direction_value == 1 and self.algorithm == "ht"
            if weight_gradients is not None and not backward_ht:
                raise InvalidArgumentError("weight_gradients: only the backward pass of HT takes weight gradients")
            if backward_ht and weight_gradients is None:
                raise InvalidArgumentError("weight_gradients: None; the backward pass of HT needs them")
            forward_ll = direction_value == 0 and self.layout == "expert_major"
            if topk_weights is not None and not forward_ll:
                raise InvalidArgumentError(combine_weights_refused(self.layout, direction_value))
            self._require_torch(expert_outputs, "expert_outputs")
            index = handle.slot
            slot = self._slots[index]
            if slot.use != handle.slot_use:   # the peers read this slot's buffers: a later dispatch rewrote them
                raise InvalidUsageError(
                    f"handle: its rows were in buffer slot {index}, which a later dispatch has used since; combine a "
                    f"step before {len(self._slots)} more dispatches")
            device = self._device
            address = _fast.check(expert_outputs, "expert_outputs", self._element_types, device, self.recv_shape)[0]
            weights = 0   # the address of the weights the call applies: the dispatch's or the call's, or the slot's received ones
            if forward_ll:
                applied = handle.topk_weights if topk_weights is None else topk_weights
                if applied is None:
                    raise InvalidArgumentError(NO_COMBINE_WEIGHTS)
                if topk_weights is not None:
                    self._require_torch(topk_weights, "topk_weights")
                weights = _fast.check(applied, "topk_weights", _F32_TYPES, device, (handle.tokens, self.top_k))[0] or self._empty
            elif direction_value == 0 and self.layout == "expert_major_padded":
                weights = slot.weights_desc.data or 0
            if backward_ht:
                self._require_torch(weight_gradients, "weight_gradients")
                _fast.check(weight_gradients, "weight_gradients", _F32_TYPES, device, self.recv_routing_shape)
            caller = None
            if out is not None:   # the caller's tensors, checked before anything is written
                caller = self._caller_combine_outputs(out, handle.tokens, backward_ht)
            return self._reduce(handle, slot, expert_outputs, address, weights, weight_gradients, caller, direction_value,
                                backward_ht, stream, wait_event, record_event, send_only)
        except BaseException:
            if send_only and self._open_send_only is None:   # (refused: nothing pending keeps what it was given)
                self._kept = None
            raise
        finally:
            lock.release()

    def _combine_common(self, expert_outputs, handle, topk_weights, out, stream, wait_event, record_event, send_only):
        """combine() of the common call, in line: forward, the step's handle (live, its slot not
        reused), ``expert_outputs`` a torch tensor of ``recv_shape`` and the group's type on its
        device, contiguous; LL expert-major with the dispatch's weights or ``topk_weights``; into
        the slot's rows or an ``out`` tensor ``[B, hidden]`` of the group's type. None for
        anything else: the general path takes it (and names what is wrong)."""
        if (type(expert_outputs) is not _fast.tensor_type or not isinstance(handle, Handle)
                or handle.group is not self or handle.released or not self._group or handle.slot is None
                or (not handle.own and handle.step != self._own_step)
                or _moved(handle)):   # (its routing moved since: the general path names it)
            return None
        slot = self._slots[handle.slot]
        shape, code, device, layout = self._common_combine
        address_of = self._fast_address
        if address_of is not None and slot.use == handle.slot_use:
            # The reads in C++ (_torch_fast.address: shape, type, device, contiguity, soundness);
            # where one says None, the Python reads below decide.
            spec, b = self._fast_spec, handle.tokens
            address, caller, weights = address_of(spec, expert_outputs, shape, code), None, 0
            fine = address is not None
            if fine and out is not None:
                fine, caller = address_of(spec, out, (b, self.hidden), code) is not None, (out, None)
            if fine and layout == "expert_major":
                weights = address_of(spec, handle.topk_weights if topk_weights is None else topk_weights, (b, self.top_k), _abi.F32)
                fine = weights is not None
            elif fine and topk_weights is not None:
                return None
            elif fine and layout == "expert_major_padded":
                weights = slot.weights_desc.data or 0
            if fine:
                return self._reduce(handle, slot, expert_outputs, address, weights, None, caller, 0, False, stream,
                                    wait_event, record_event, send_only)
        try:
            if not (slot.use == handle.slot_use and expert_outputs.shape == shape and _fast.torch_codes.get(expert_outputs.dtype) == code
                    and expert_outputs.get_device() == device and expert_outputs.is_contiguous()):
                return None
            b, caller, weights = handle.tokens, None, 0
            if out is not None:
                if (type(out) is not _fast.tensor_type or out.shape != (b, self.hidden) or _fast.torch_codes.get(out.dtype) != code
                        or out.get_device() != device or not out.is_contiguous()):
                    return None
                given = out.data_ptr()
                if not given and b or not _fast.sound(out, given):   # (no memory: meta; a negative view, a shrunk storage: the general path names it)
                    return None
                caller = (out, None)
            if layout == "expert_major":
                applied = handle.topk_weights if topk_weights is None else topk_weights
                if (type(applied) is not _fast.tensor_type or applied.shape != (b, self.top_k)
                        or _fast.torch_codes.get(applied.dtype) != _abi.F32 or applied.get_device() != device or not applied.is_contiguous()):
                    return None
                weights = applied.data_ptr()
                if not weights and b or not _fast.sound(applied, weights):
                    return None
                weights = weights or self._empty
            elif topk_weights is not None:
                return None
            elif layout == "expert_major_padded":
                weights = slot.weights_desc.data or 0
            address = expert_outputs.data_ptr()
            if not address or not _fast.sound(expert_outputs, address):   # (recv_shape is never empty: 0 is no memory)
                return None
        except RuntimeError:   # a sparse or nested tensor (no sizes or strides): the general path names it
            return None
        return self._reduce(handle, slot, expert_outputs, address, weights, None, caller, 0, False, stream,
                            wait_event, record_event, send_only)

    def _reduce(self, handle, slot, expert_outputs, address, weights, weight_gradients, caller, direction_value, backward_ht,
                stream, wait_event, record_event, send_only):
        """A combine whose arguments are checked: `address` the expert outputs' (`expert_outputs`:
        the slot's own buffer, or a tensor of the caller's whose received rows the library copies
        there on the stream), `weights` the address of the weights it applies (0: none), `caller`
        the checked ``out`` (tokens, weight gradients) or None; into the slot's combined rows
        otherwise. Its result."""
        device, element, index = self._device, self._element, handle.slot
        b = handle.tokens
        raw = self._stream_of(stream, wait_event)
        if backward_ht and weight_gradients.data_ptr() != slot.weight_grads.data_ptr():   # into the buffer the others read
            import torch

            # On the call's stream (CPU tensors, the tests' harness of the data path, have none).
            with contextlib.nullcontext() if device < 0 else torch.cuda.stream(_fast.torch_stream(device, stream)):
                slot.weight_grads.copy_(weight_gradients)
        if caller is not None:
            combined, weight_grads = caller
            combined_address, grads_address = combined.data_ptr() or self._empty, (weight_grads.data_ptr() or self._empty) if backward_ht else 0
        else:
            views = self._combined_views[index]
            targets = views.get((b, backward_ht))
            if targets is None:   # the combined rows (and weight gradients) of b tokens: views made once per slot
                combined, weight_grads = slot.combined[:b], slot.combined_grads[:b] if backward_ht else None
                targets = (combined, weight_grads, combined.data_ptr() or self._empty,
                           (weight_grads.data_ptr() or self._empty) if backward_ht else 0)
                views[(b, backward_ht)] = targets
            combined, weight_grads, combined_address, grads_address = targets   # (handed out detached: below)
        call = self._combine_calls[index]
        call.rank_combine(address, element, weights, (slot.grads_desc.data or 0) if backward_ht else 0, combined_address, grads_address,
                          direction_value, _abi.PHASE_SEND_ONLY if send_only else _abi.PHASE_WHOLE, handle._pointer)
        status = self._fn_combine_stacked(self._group_address, call.address, raw)
        if status:
            check_status(status, errors.COMBINE_SLOT if caller is None else errors.COMBINE_OUT, kind="torch")
        # A new tensor object per call over the slot's rows: what a caller does to its own (autograd
        # history, in-place metadata) stays with it, not with the next combine's result.
        if caller is not None:
            result: Any = (combined, weight_grads) if backward_ht else combined
        else:
            result = (combined.detach(), weight_grads.detach()) if backward_ht else combined.detach()
        return self._combine_result(result, send_only, record_event, stream) if send_only or record_event else result

    @locked
    def complete(self, *, stream: Any = None) -> None:
        """Enqueues the receiving half of this rank's last ``send_only`` dispatch or combine."""
        self._check_open()
        raw = self._raw(stream)   # (a stream of the wrong kind: refused before the library takes the pending call)
        try:
            call("epComplete", self._handle, raw)
        finally:   # (the library's pending call is taken at complete()'s start, whatever follows)
            self._open_send_only = None
        self._release_kept(stream)

    # -- helpers -----------------------------------------------------------------------------

    def _require_torch(self, value, name):
        if (type(value) is not _fast.tensor_type or value is None) and not _arrays.is_torch(value):
            raise InvalidArgumentError(f"{name}: a {type(value).__name__}; an NCCL group takes CUDA torch tensors")

    def _caller_combine_outputs(self, out, tokens, backward_ht):
        """(tokens, weight gradients or None) of combine's ``out=``: a ``[B, hidden]`` tensor of
        the group's type, and for HT's backward pass a ``[B, top_k]`` float32 tensor beside it."""
        if backward_ht:
            # (a tuple or list only: a [2, B, hidden] tensor would unpack along its first dimension)
            if type(out) is not tuple and type(out) is not list or len(out) != 2:
                raise InvalidArgumentError(
                    f"out: a {type(out).__name__}; the backward pass of HT takes (tokens, topk_weight_gradients)")
            combined, grads = out
        else:
            combined, grads = out, None
        self._require_torch(combined, "out")
        _fast.check(combined, "out", self._element_types, self._device, (tokens, self.hidden), output=True)
        if backward_ht:
            self._require_torch(grads, "out gradients")
            _fast.check(grads, "out gradients", _F32_TYPES, self._device, (tokens, self.top_k), output=True)
        return combined, grads

    def _raw(self, stream):
        """The CUstream of `stream` (None: PyTorch's current one on the group's device), an int."""
        return _fast.raw_stream(self._device, stream)

    @locked
    def _layout_of(self, handle):
        self._check_handle(handle, dispatched=True)
        buffers = _LayoutBuffers(self.local_experts, self.ranks)
        if handle.own:
            call("epStepGetLayoutInfo", handle._pointer, self.rank, ctypes.byref(buffers.struct))
        else:
            call("epGroupGetLayoutInfo", self._group, self.rank, ctypes.byref(buffers.struct))
        return buffers.value()
