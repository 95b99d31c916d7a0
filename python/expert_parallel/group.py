"""VirtualGroup: R ranks driven from one process, on the CPU or on one GPU."""

from __future__ import annotations

import ctypes
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Union

from . import _abi, _arrays, _config
from ._config import INT32 as _INT32
from ._config import choice as _choice
from ._config import integer as _int
from ._group_base import GroupBase, locked
from ._library import call, load
from ._types import Algorithm, Array, Direction, DType, Launch, Layout, Overflow, PerRank, Seconds
from .errors import InvalidArgumentError, InvalidUsageError

_SIZE_HINT = "lower max_tokens or hidden (HT: set max_recv_tokens)"


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


class Handle:
    """One step's state: made by :meth:`VirtualGroup.dispatch`, consumed by :meth:`VirtualGroup.combine`.

    It keeps the step's routing and weights alive (the GPU reads ``topk_idx`` again in combine) and
    is valid until the group's next dispatch.
    """

    def __init__(self, group: Any, step: int, tokens: Any, topk_idx: Any, topk_weights: Any,
                 received_weights: Any) -> None:
        self.group = group
        self.step = step
        self.tokens = tokens  # per rank: B_r
        self.topk_idx = topk_idx
        self.topk_weights = topk_weights
        self.received_weights = received_weights

    def __repr__(self) -> str:
        return f"Handle(step={self.step}, tokens={self.tokens})"


class DispatchResult:
    """What :meth:`VirtualGroup.dispatch` returns; lists hold one entry per rank.

    - ``tokens``: the received rows (the group's ``recv_shape``);
    - ``topk_idx`` / ``topk_weights``: the received local routing (``recv_routing_shape``; int32 /
      float32), or None for LL expert-major;
    - ``layout``: a :class:`LayoutInfo` per rank (on the GPU read on first use, which waits for the
      stream);
    - ``handle``: pass it to :meth:`VirtualGroup.combine`.
    """

    def __init__(self, tokens: Any, topk_idx: Any, topk_weights: Any, handle: Handle, layout: Any = None) -> None:
        self.tokens = tokens
        self.topk_idx = topk_idx
        self.topk_weights = topk_weights
        self.handle = handle
        self._layout = layout

    @property
    def layout(self) -> Any:
        """A :class:`LayoutInfo` per rank (:class:`VirtualGroup`) or this rank's (:class:`NCCLGroup`)."""
        if self._layout is None:
            self._layout = self.handle.group._layout_of_step(self.handle.step)
        return self._layout

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``tokens, topk_idx, topk_weights, layout, handle``."""
        return iter((self.tokens, self.topk_idx, self.topk_weights, self.layout, self.handle))


def _device_ordinal(device):
    text = str(device)
    if text == "cpu":
        return -1
    if text == "cuda":
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise InvalidArgumentError(f"device={device!r}; must be 'cpu', 'cuda' or 'cuda:N'")


class VirtualGroup(GroupBase):
    """R ranks in one process: on the CPU (``device="cpu"``, NumPy arrays or CPU torch tensors) or
    on one GPU (``device="cuda:N"``, CUDA torch tensors; HT there with ``overflow="fail"`` only so far).

    ``algorithm``: "ll" (low latency) or "ht" (high throughput). ``layout``: "expert_major" or
    "rank_major" (LL), "flat" or "expert_major_padded" (HT, with ``alignment``); default
    expert-major for LL, flat for HT. ``dtype``: the token element type ("bf16", "f16", "f32",
    "u8"); NumPy has no bf16, so bf16 arrays are uint16 arrays of the raw bits.
    ``max_recv_tokens``: HT receive capacity (None: one that never overflows). ``overflow``:
    "fail" or "drop". ``timeout``: seconds any rank waits for another.
    """

    def __init__(self, ranks: int, experts: int, hidden: int, top_k: int, max_tokens: int, *,
                 algorithm: Algorithm = "ll", layout: Optional[Layout] = None, alignment: int = 1,
                 dtype: DType = "bf16", device: str = "cpu", max_recv_tokens: Optional[int] = None,
                 overflow: Overflow = "fail", timeout: Seconds = 10.0, multiprocessors: Optional[int] = None) -> None:
        load()
        self._group = None
        self._device = _device_ordinal(device)
        config, self._element = _config.group_config(
            ranks=ranks, experts=experts, hidden=hidden, top_k=top_k, max_tokens=max_tokens, algorithm=algorithm,
            layout=layout, alignment=alignment, dtype=dtype, max_recv_tokens=max_recv_tokens, overflow=overflow,
            timeout=timeout)
        backend = _abi.new(
            _abi.BackendConfig,
            backend=_abi.BACKEND_HOST if self._device == -1 else _abi.BACKEND_VIRTUAL_GPU,
            device=max(self._device, 0),
            multiprocessors=0 if multiprocessors is None else _int(multiprocessors, "multiprocessors", 1, _INT32))
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
        self._step = 0

    def __repr__(self) -> str:
        return (f"VirtualGroup(ranks={self.ranks}, experts={self.experts}, hidden={self.hidden}, top_k={self.top_k}, "
                f"max_tokens={self.max_tokens}, algorithm={self.algorithm!r}, layout={self.layout!r}, "
                f"dtype={self.dtype!r}, device={self.device!r})")

    # -- the step ----------------------------------------------------------------------------

    @locked
    def dispatch(self, xs: PerRank, topk_idx: PerRank, topk_weights: Optional[PerRank] = None, *,
                 direction: Direction = "forward", launch: Launch = "single") -> DispatchResult:
        """Sends every rank's tokens to the ranks of their top-k experts.

        ``xs[r]``: ``[B_r, hidden]`` tokens of rank r; ``topk_idx[r]``: ``[B_r, top_k]`` int32 or
        int64 global expert ids (-1: none); ``topk_weights[r]``: ``[B_r, top_k]`` float32 (required
        except for LL expert-major, whose combine needs them instead). Returns a
        :class:`DispatchResult`. On the GPU the work is enqueued on the current CUDA stream.
        """
        self._check_open()
        mode = _choice(launch, "launch", _abi.LAUNCH_MODES)
        direction_value = _choice(direction, "direction", _abi.DIRECTIONS)
        xs = self._per_rank(xs, "xs")
        topk_idx = self._per_rank(topk_idx, "topk_idx")
        topk_weights = None if topk_weights is None else self._per_rank(topk_weights, "topk_weights")
        if topk_weights is None and self.recv_routing_shape is not None:
            raise InvalidArgumentError(f"topk_weights: None; layout {self.layout!r} sends the weights with the tokens")
        like = self._same_kind(xs, "xs")
        h, k = self.hidden, self.top_k
        token_counts, x_desc, idx_desc, w_desc = [], [], [], []
        for r in range(self.ranks):
            x = _arrays.tensor(xs[r], f"xs[{r}]", dtypes={self._element}, device=self._device, shape=(None, h))
            b = x.sizes[0]
            if b > self.max_tokens:
                raise InvalidArgumentError(f"xs[{r}]: {b} tokens; must be ≤ max_tokens ({self.max_tokens})")
            token_counts.append(b)
            x_desc.append(x)
            idx_desc.append(_arrays.tensor(topk_idx[r], f"topk_idx[{r}]", dtypes={_abi.I32, _abi.I64},
                                           device=self._device, shape=(b, k)))
            w_desc.append(None if topk_weights is None else _arrays.tensor(
                topk_weights[r], f"topk_weights[{r}]", dtypes={_abi.F32}, device=self._device, shape=(b, k)))

        allocate = _arrays.Allocator(like)
        element_dtype = None if allocate.torch else like.dtype
        received = [allocate.zeros(self.recv_shape, self._element, element_dtype, name=f"dispatch tokens[{r}]",
                                   hint=_SIZE_HINT) for r in range(self.ranks)]
        routing = self.recv_routing_shape
        received_idx: Any = None if routing is None else [
            allocate.zeros(routing, _abi.I32, name=f"dispatch topk_idx[{r}]", hint=_SIZE_HINT) for r in range(self.ranks)]
        received_w: Any = None if routing is None else [
            allocate.zeros(routing, _abi.F32, name=f"dispatch topk_weights[{r}]", hint=_SIZE_HINT)
            for r in range(self.ranks)]
        recv_desc = [self._describe_output(t, self._element, f"received[{r}]") for r, t in enumerate(received)]
        ridx_desc = [None] * self.ranks if routing is None else [
            self._describe_output(t, _abi.I32, f"received_idx[{r}]") for r, t in enumerate(received_idx)]
        rw_desc = [None] * self.ranks if routing is None else [
            self._describe_output(t, _abi.F32, f"received_weights[{r}]") for r, t in enumerate(received_w)]
        on_host = self._device == -1
        layouts: Any = [_LayoutBuffers(self.local_experts, self.ranks) for _ in range(self.ranks)] if on_host else None

        update = (_abi.UpdateInputs * self.ranks)()
        inputs = (_abi.DispatchInputs * self.ranks)()
        outputs = (_abi.DispatchOutputs * self.ranks)()
        for r in range(self.ranks):
            update[r] = _abi.new(_abi.UpdateInputs, topkIdx=ctypes.pointer(idx_desc[r]))
            inputs[r] = _abi.new(_abi.DispatchInputs, tokens=ctypes.pointer(x_desc[r]), topkWeights=_arrays.pointer(w_desc[r]))
            outputs[r] = _abi.new(
                _abi.DispatchOutputs, tokens=ctypes.pointer(recv_desc[r]), topkIdx=_arrays.pointer(ridx_desc[r]),
                topkWeights=_arrays.pointer(rw_desc[r]),
                layoutInfo=ctypes.pointer(layouts[r].struct) if on_host else None)
        update_config = _abi.new(_abi.UpdateConfig, launchMode=mode)
        dispatch_config = _abi.new(_abi.DispatchConfig, direction=direction_value, launchMode=mode)
        stream = self._stream(like)
        call("epGroupUpdateAll", self._group, update, ctypes.byref(update_config), stream)
        self._step += 1  # the group now holds this step's routing: earlier handles are void
        call("epGroupDispatchAll", self._group, inputs, outputs, ctypes.byref(dispatch_config), stream)
        handle = Handle(self, self._step, token_counts, list(topk_idx),
                        None if topk_weights is None else list(topk_weights), received_w)
        layout = [buffers.value() for buffers in layouts] if on_host else None
        return DispatchResult(received, received_idx, received_w, handle, layout)

    @locked
    def combine(self, expert_outputs: PerRank, handle: Handle, *, direction: Direction = "forward",
                weight_gradients: Optional[PerRank] = None,
                launch: Launch = "single") -> Union[List[Array], Tuple[List[Array], List[Array]]]:
        """Brings every rank's expert outputs back and reduces them into its tokens' order.

        ``expert_outputs[r]``: shaped like ``dispatch(...).tokens[r]`` (``recv_shape``);
        ``handle``: the handle of this group's last dispatch. Forward LL expert-major applies the
        ``topk_weights`` given to dispatch; other layouts expect rows already weighted by the
        expert rank (HT expert-major uses the per-slot weights dispatch delivered). Returns the
        ``[B_r, hidden]`` combined tokens per rank; backward HT takes ``weight_gradients[r]``
        (shaped like ``dispatch(...).topk_weights[r]``) and returns ``(tokens, topk_weight_gradients)``.
        """
        self._check_open()
        direction_value = _choice(direction, "direction", _abi.DIRECTIONS)
        launch_value = _choice(launch, "launch", _abi.LAUNCH_MODES)
        if not isinstance(handle, Handle) or handle.group is not self:
            raise InvalidArgumentError("handle: must be the handle of a dispatch of this group")
        if handle.step != self._step:
            raise InvalidUsageError(
                f"handle: from step {handle.step}, but the group has dispatched step {self._step} since; "
                "combine each step before the next dispatch")
        backward_ht = direction == "backward" and self.algorithm == "ht"
        outputs_in = self._per_rank(expert_outputs, "expert_outputs")
        like = self._same_kind(outputs_in, "expert_outputs")
        if weight_gradients is not None and not backward_ht:
            raise InvalidArgumentError("weight_gradients: only the backward pass of HT takes weight gradients")
        gradients = None
        if backward_ht:
            if weight_gradients is None:
                raise InvalidArgumentError("weight_gradients: None; the backward pass of HT needs them")
            gradients = self._per_rank(weight_gradients, "weight_gradients")

        weights = [None] * self.ranks
        if direction == "forward" and self.layout == "expert_major":
            if handle.topk_weights is None:
                raise InvalidArgumentError(
                    "topk_weights: not given to dispatch; the forward combine of LL expert-major applies them")
            weights = handle.topk_weights
        elif direction == "forward" and self.layout == "expert_major_padded":
            weights = handle.received_weights

        allocate = _arrays.Allocator(like)
        element_dtype = None if allocate.torch else like.dtype
        combined = [allocate.zeros((b, self.hidden), self._element, element_dtype, name=f"combined tokens[{r}]")
                    for r, b in enumerate(handle.tokens)]
        weight_grads = [allocate.zeros((b, self.top_k), _abi.F32, name=f"topk_weight_gradients[{r}]")
                        for r, b in enumerate(handle.tokens)] if backward_ht else None
        keep = []
        inputs = (_abi.CombineInputs * self.ranks)()
        outputs = (_abi.CombineOutputs * self.ranks)()
        for r in range(self.ranks):
            y = _arrays.tensor(outputs_in[r], f"expert_outputs[{r}]", dtypes={self._element}, device=self._device,
                               shape=self.recv_shape)
            w = None
            if weights[r] is not None:
                shape = (handle.tokens[r], self.top_k) if self.layout == "expert_major" else self.recv_routing_shape
                w = _arrays.tensor(weights[r], f"topk_weights[{r}]", dtypes={_abi.F32}, device=self._device, shape=shape)
            g = None if gradients is None else _arrays.tensor(
                gradients[r], f"weight_gradients[{r}]", dtypes={_abi.F32}, device=self._device, shape=self.recv_routing_shape)
            out = self._describe_output(combined[r], self._element, f"combined[{r}]")
            out_g = None if weight_grads is None else self._describe_output(weight_grads[r], _abi.F32, f"weight_grads[{r}]")
            keep += [y, w, g, out, out_g]
            inputs[r] = _abi.new(_abi.CombineInputs, expertOutputs=ctypes.pointer(y), topkWeights=_arrays.pointer(w),
                                 weightGradients=_arrays.pointer(g))
            outputs[r] = _abi.new(_abi.CombineOutputs, tokens=ctypes.pointer(out),
                                  topkWeightGradients=_arrays.pointer(out_g))
        config = _abi.new(_abi.CombineConfig, direction=direction_value, launchMode=launch_value)
        call("epGroupCombineAll", self._group, inputs, outputs, ctypes.byref(config), self._stream(like))
        if weight_grads is not None:
            return combined, weight_grads
        return combined

    # -- the active-rank mask ----------------------------------------------------------------

    @locked
    def deactivate(self, rank: int) -> None:
        """Masks `rank` inactive: it sends and receives nothing until cleaned."""
        self._check_open()
        call("epGroupDeactivateRank", self._group, _int(rank, "rank", -2**31, _INT32))

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
        for r in chosen:
            mask |= 1 << _int(r, "ranks[...]", 0, self.ranks - 1)
        call("epGroupCleanRanks", self._group, mask)

    # -- helpers -----------------------------------------------------------------------------

    def _per_rank(self, values, name):
        try:
            values = list(values)
        except TypeError:
            raise InvalidArgumentError(f"{name}: a {type(values).__name__}; must be a list of {self.ranks} per-rank arrays")
        if len(values) != self.ranks:
            raise InvalidArgumentError(f"{name}: {len(values)} entries; must be one per rank ({self.ranks})")
        return values

    def _same_kind(self, values, name):
        first = _arrays.kind(values[0])
        for r, value in enumerate(values):
            if _arrays.kind(value) is None:
                raise InvalidArgumentError(f"{name}[{r}]: a {type(value).__name__}; must be a NumPy array or a PyTorch tensor")
            if _arrays.kind(value) != first:
                raise InvalidArgumentError(f"{name}[{r}]: a {_arrays.kind(value)} value among {first} values; use one kind")
        if self._device != -1 and first != "torch":
            raise InvalidArgumentError(f"{name}[0]: a NumPy array; a GPU group takes CUDA torch tensors")
        return values[0]

    def _stream(self, like):
        if self._device == -1:
            return None
        import torch

        return ctypes.c_void_p(torch.cuda.current_stream(like.device).cuda_stream or None)

    @locked
    def _layout_of_step(self, step):
        if step != self._step:
            raise InvalidUsageError(f"layout info of step {step} is gone: the group has dispatched step {self._step} since")
        infos = []
        for r in range(self.ranks):
            buffers = _LayoutBuffers(self.local_experts, self.ranks)
            call("epGroupGetLayoutInfo", self._group, r, ctypes.byref(buffers.struct))
            infos.append(buffers.value())
        return infos
