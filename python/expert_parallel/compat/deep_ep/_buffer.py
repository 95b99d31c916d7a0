"""Buffer: DeepEP's ``deep_ep.Buffer`` (intranode and low-latency paths) over expert_parallel groups."""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, List, Optional, Tuple, Union

from ...errors import InvalidArgumentError, InvalidUsageError
from ..._config import integer, process_group_place, seconds
from . import _engine, _events
from ._agreement import warm_up
from ._config import Config, check_num_sms, default_config
from ._engine import Payload
from ._errors import not_supported
from ._events import EventOverlap
from ._handle import DispatchHandle
from ._groups import Groups
from ._layout import (dispatch_layout, flag, group_dtype, overlaps, require_contiguous, require_shape, require_tensor, routing,
                      torch_module)
from ._unused_settings import ALIGNMENT, checked, virtual_ignored
from ._virtual import Failed, Rendezvous, Solo

_NVL_PEERS = 8   # DeepEP's ranks per NVLink domain: more ranks than this span nodes
_DEFAULT_TOKENS = 4096
_MAX_TIMEOUT = 86400.0   # the groups' bound (a day)


def _timeout(value: Any) -> float:
    """``timeout=`` checked: seconds in (0, a day], the groups' bound. The ranks' meeting waits
    this long as well, where NaN never timed out, infinity raised the threading module's
    OverflowError and 0 timed every waiting rank out at once."""
    wait = seconds(value, "timeout")
    if not 0 < wait <= _MAX_TIMEOUT:
        raise InvalidArgumentError(f"timeout={value!r}; must be in (0, {_MAX_TIMEOUT:g}] seconds")
    return wait


def _device(value: Any) -> str:
    """``device=`` checked: "cpu", "cuda" or "cuda:N" (as the groups take it; anything else
    reached torch.device at the first call, whose RuntimeError named no argument)."""
    text = str(value)
    if text != "cpu" and not re.fullmatch(r"cuda(:[0-9]{1,10})?", text):
        raise InvalidArgumentError(f"device={value!r}; must be 'cpu', 'cuda' or 'cuda:N'")
    return text


class _Shared:
    """What the Buffers of one set of ranks share: their groups, how they meet, who is still open."""

    def __init__(self, groups: Groups, meeting: Any, ranks: int) -> None:
        self.groups, self.meeting, self.open = groups, meeting, ranks


def _collective(method: Callable) -> Callable:
    """Buffer's `method` (one that makes a collective call through :meth:`Buffer._call`): where it
    fails before this rank joins the call's round — its argument checks, on this rank — the rank
    takes its round all the same with the error (a :class:`Failed` arrival), so the round fails at
    once on every rank (the others get :class:`expert_parallel.PeerFailedError` naming this rank's
    error) and the ranks stay in step; this rank raises its own error. A failure once the round is
    joined (the call's own, every rank's) is raised as it is. A process's one rank (:class:`Solo`)
    just raises."""
    name = method.__name__

    @functools.wraps(method)
    def call(self: "Buffer", *arguments: Any, **keywords: Any) -> Any:
        joined = self._joined
        try:
            return method(self, *arguments, **keywords)
        except BaseException as error:
            if self._joined == joined:   # (not joined: a check failed)
                self._joined += 1
                self._shared.meeting.call(self.rank, name, Failed(error), _no_work)   # takes the round; raises `error`
            raise

    return call


def _no_work(payloads: List[Any]) -> List[Any]:   # (a Failed arrival's round runs none)
    raise AssertionError("a failed round runs no work")


class Buffer:
    """DeepEP's ``deep_ep.Buffer`` for one rank: the same constructor, methods, return tuples and
    semantics for the intranode (``dispatch`` / ``combine``) and low-latency
    (``low_latency_dispatch`` / ``low_latency_combine``) paths, over expert_parallel's groups.

    ``group``: a torch.distributed process group (NCCL or gloo: it carries only the setup). On a
    machine with CUDA each process is one rank on its current device (``NCCLGroup``); without,
    a group of one rank runs on the CPU backend. R ranks in one
    process, one thread each: :meth:`virtual`. ``num_nvl_bytes``, ``num_rdma_bytes``,
    ``num_qps_per_rank``, ``allow_nvlink_for_low_latency_mode``, ``allow_mnnvl``, ``use_fabric``,
    ``explicitly_destroy`` and ``enable_shrink`` are accepted and not used: groups size their
    buffers from the calls' shapes, and there is no RDMA. They are checked as DeepEP checks them,
    each a named :class:`expert_parallel.InvalidArgumentError` (a ``ValueError`` and ``TypeError``):
    byte counts integers in [0, 16 × (2^31 − 1)), multiples of 128; flags bools (or 0 / 1);
    ``num_qps_per_rank`` an integer ≥ 0, ≥ 1 with ``low_latency_mode``. More ranks than one node's 8 (internode)
    and ``comm`` (mpi4py) raise :class:`NotSupportedError`.

    Keywords of this adapter: ``device`` (default: the current CUDA device where PyTorch finds one, else "cpu"),
    ``max_tokens_per_rank`` (the high-throughput capacity of a multi-process Buffer, default 4096;
    one process's ranks grow theirs as needed), ``timeout`` (seconds a rank waits for the others).
    """

    #: SMs the high-throughput kernels may use once :meth:`set_num_sms` is called (DeepEP's default 20)
    num_sms: int = 20
    _num_sms_set = False

    def __init__(self, group: Any, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False, comm: Any = None,
                 *, device: Optional[str] = None, max_tokens_per_rank: Optional[int] = None, timeout: float = 10.0) -> None:
        if comm is not None:
            raise not_supported("comm", comm, "pass a torch.distributed process group as group")
        num_nvl_bytes, num_rdma_bytes, low_latency_mode = checked(
            num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
            allow_nvlink_for_low_latency_mode=allow_nvlink_for_low_latency_mode, allow_mnnvl=allow_mnnvl, use_fabric=use_fabric,
            explicitly_destroy=explicitly_destroy, enable_shrink=enable_shrink)
        import torch.distributed as dist

        if group is None:
            raise InvalidArgumentError("group=None; must be a torch.distributed process group (Buffer.virtual makes ranks in one process)")
        rank, size = process_group_place(dist, group, "group")
        local_text = os.environ.get("LOCAL_WORLD_SIZE", str(size))
        if not (local_text.isascii() and local_text.strip().isdigit()):   # (int() raised its ValueError)
            raise InvalidArgumentError(f"LOCAL_WORLD_SIZE={local_text!r} (environment); must be the number of ranks on this node")
        local = int(local_text)
        if size > _NVL_PEERS or local < size:
            raise not_supported("group", f"{size} ranks over {max(1, size // max(local, 1))} nodes",
                                f"internode dispatch (RDMA) is not offered; every rank must be on one node, ≤ {_NVL_PEERS} ranks")
        if device is None:   # (CUDA whatever the group's backend: vLLM passes a gloo group for the metadata, as DeepEP allows)
            torch = torch_module()
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        device = _device(device)
        if device == "cpu" and size > 1:
            raise not_supported("group", f"a {size}-rank process group on the CPU",
                                "the CPU backend runs every rank in one process: use Buffer.virtual(ranks=...)")
        fixed = None
        if max_tokens_per_rank is not None:   # (checked wherever given: one process's ranks ignore it, a wrong one too)
            max_tokens_per_rank = integer(max_tokens_per_rank, "max_tokens_per_rank", 1, 2**31 - 1)
        if device != "cpu" and size > 1:
            fixed = _DEFAULT_TOKENS if max_tokens_per_rank is None else max_tokens_per_rank
        groups = Groups(ranks=size if device != "cpu" else 1, device=device, timeout=_timeout(timeout),
                        process_group=group, fixed_tokens=fixed)
        if groups.nccl:
            warm_up(group)   # (every rank constructs its Buffer, as in DeepEP: the group's setup happens here)
        self._setup(rank, size, group, device, _Shared(groups, Solo(), 1), num_nvl_bytes, num_rdma_bytes,
                    low_latency_mode)

    @classmethod
    def virtual(cls, ranks: int, *, device: str = "cpu", num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                low_latency_mode: bool = False, timeout: float = 10.0, **ignored: Any) -> List["Buffer"]:
        """R Buffers for R virtual ranks in this process, on ``device`` ("cpu" or "cuda:N"), one per
        rank: give each to a thread of its own (:func:`run_ranks`). A collective call runs once all
        R ranks have made it, as one group call covering every rank; a rank that waits ``timeout``
        seconds for the others gets :class:`expert_parallel.RankTimeoutError`. A rank whose call
        fails its own argument checks still takes its turn: it raises its own error at once, the
        call fails at once on the other ranks with :class:`expert_parallel.PeerFailedError` naming
        it (no rank's call runs), and the ranks' next calls meet as before. The other constructor
        arguments of :class:`Buffer` (by keyword) are accepted, checked as Buffer checks them, and
        not used; another keyword is an error."""
        num_nvl_bytes, num_rdma_bytes, low_latency_mode = virtual_ignored(num_nvl_bytes, num_rdma_bytes, low_latency_mode, ignored)
        device = _device(device)
        ranks = integer(ranks, "ranks", 1, 32 if device != "cpu" else 64)
        wait = _timeout(timeout)
        shared = _Shared(Groups(ranks=ranks, device=device, timeout=wait), Rendezvous(ranks, wait), ranks)
        buffers = []
        for r in range(ranks):
            buffer = cls.__new__(cls)
            buffer._setup(r, ranks, None, device, shared, num_nvl_bytes, num_rdma_bytes, low_latency_mode)
            buffers.append(buffer)
        return buffers

    def _setup(self, rank: int, size: int, group: Any, device: str, shared: _Shared, num_nvl_bytes: int,
               num_rdma_bytes: int, low_latency_mode: bool) -> None:
        self.rank, self.group_size, self.group, self.device = rank, size, group, device
        self.num_nvl_bytes, self.num_rdma_bytes, self.low_latency_mode = num_nvl_bytes, num_rdma_bytes, low_latency_mode
        self._shared = shared
        self._destroyed = False
        self._joined = 0   # the collective rounds this rank has joined (see _collective)

    def __repr__(self) -> str:
        return f"Buffer(rank={self.rank}, group_size={self.group_size}, device={self.device!r})"

    # -- lifetime and settings ----------------------------------------------------------------

    def destroy(self) -> None:
        """Ends this rank's use of the buffer; the groups close when every rank of the set has."""
        if self._destroyed:
            return
        self._destroyed = True
        shared = self._shared
        with shared.meeting.lock:
            shared.open -= 1
            if shared.open == 0:
                shared.groups.close()

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True, as DeepEP's build for Hopper answers: the kernels are compiled at run time for the
        device's architecture (Hopper's features included)."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the SMs the high-throughput calls use on the GPU (even, ≥ 2); until it is called
        they use every SM. The CPU backend ignores it."""
        Buffer.num_sms = check_num_sms(new_num_sms, "new_num_sms")
        Buffer._num_sms_set = True

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current CUDA stream (no event without CUDA)."""
        torch = torch_module()
        return EventOverlap(_events.record("cuda") if torch.cuda.is_available() else None)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """The bytes a rank's low-latency group keeps for these shapes in bf16: two buffer slots of
        received rows ``[L, R*Bmax, H]`` and combined rows ``[Bmax, H]``. Buffers are made by the
        calls, so ``num_rdma_bytes`` need not hold them. Rounded up to DeepEP's 128-byte alignment,
        as DeepEP's hint is, so that it is a ``num_rdma_bytes`` the Buffer takes."""
        bmax = integer(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1, 2**31 - 1)
        h = integer(hidden, "hidden", 1, 2**31 - 1)
        r = integer(num_ranks, "num_ranks", 1, 2**31 - 1)
        e = integer(num_experts, "num_experts", r, 2**31 - 1)
        return -(-2 * ((e // r) * r * bmax * h * 2 + bmax * h * 2) // ALIGNMENT) * ALIGNMENT

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's default dispatch config: ``Config(Buffer.num_sms)`` (only num_sms is used)."""
        integer(num_ranks, "num_ranks", 1, 2**31 - 1)
        return default_config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's default combine config: ``Config(Buffer.num_sms)`` (only num_sms is used)."""
        integer(num_ranks, "num_ranks", 1, 2**31 - 1)
        return default_config(Buffer.num_sms)

    # -- helpers -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._destroyed:
            raise InvalidUsageError(f"Buffer of rank {self.rank}: destroyed")

    def _call(self, name: str, work: Callable, previous_event: Any, async_finish: bool, **args: Any) -> Tuple[Any, EventOverlap]:
        """Runs collective call `name` with this rank's `args`; returns (this rank's result, its event).
        Its caller is a :func:`_collective` method: what fails here before the round is joined is
        that method's check failure (the rank still takes its round)."""
        self._check_open()
        async_finish = flag(async_finish, "async_finish")
        _events.wait(previous_event, self.device)
        groups, meeting = self._shared.groups, self._shared.meeting
        if type(meeting) is Solo:
            # This process's one rank: the call runs on the current stream, after its inputs and
            # before what comes next there, so only async_finish asks for an event.
            self._joined += 1
            result = meeting.call(self.rank, name, Payload(self.rank, None, args), lambda payloads: _engine.untracked(work, groups, payloads))
            return result, EventOverlap(_events.record(self.device) if async_finish else None)
        # Virtual ranks: the last rank to arrive runs the call on its current stream, after every
        # rank's inputs are ready there; each rank's stream then waits for it.
        payload = Payload(self.rank, _events.record(self.device), args)
        self._joined += 1   # (from here a failure is the round's, on every rank)
        result, done = meeting.call(self.rank, name, payload, lambda payloads: _engine.run(groups, work, payloads))
        if not async_finish:
            _events.wait(done, self.device)
        return result, EventOverlap(done if async_finish else None)

    def _hook(self, split: Tuple[Any, Any, Any]) -> Callable[[], None]:
        """The receive hook of a send-only call: completes it, on the calling thread's current
        stream, once (whichever rank calls first; a later call on the group may have already).
        Virtual ranks: that rank records an event after it, and every rank's hook makes its own
        current stream wait for it (a rank's thread may have a stream of its own), as the other
        calls' ranks wait for the call's `done`; a call completed by a later call needs none
        (that call's `done` is waited on)."""
        entry, token, record = split
        meeting = self._shared.meeting
        device, solo = self.device, type(meeting) is Solo

        def hook() -> None:
            keep = record   # the call's steps stay with the hook  # noqa: F841
            with meeting.lock:
                if entry.settle(token) and not solo:
                    token.event = _events.record(device)
            if not solo:
                _events.wait(token.event, device)

        return hook

    def _own_handle(self, handle: Any, kind: str) -> None:
        """`handle` checked to be what this rank's dispatch of `kind` ("ht": dispatch, "ll":
        low_latency_dispatch) returned: another rank's (virtual ranks share a process, so a rank
        may pick up its peer's) ran as this rank's and combined its peer's rows silently."""
        if not isinstance(handle, DispatchHandle) or handle.record.kind != kind:
            what = "dispatch" if kind == "ht" else "low_latency_dispatch"
            raise InvalidArgumentError(f"handle: a {type(handle).__name__}; must be the handle {what} returned")
        if handle.rank != self.rank:
            raise InvalidArgumentError(f"handle: rank {handle.rank}'s; this Buffer is rank {self.rank}: pass the handle "
                                       "its own dispatch returned")
        if handle.record.last.owner is not self._shared.groups:
            # Another Buffer's (vLLM and SGLang keep one for each path): its call ran on that
            # Buffer's group, outside this Buffer's lock, or, that Buffer destroyed, failed with
            # "the group is closed", naming neither the handle nor the Buffer.
            what = "dispatch" if kind == "ht" else "low_latency_dispatch"
            raise InvalidArgumentError(f"handle: from another Buffer's {what}; this Buffer ({self!r}) takes the handles "
                                       f"its own {what} returned")

    def _multiprocessors(self, config: Optional[Config]) -> Optional[int]:
        if config is not None:
            if not isinstance(config, Config):
                raise InvalidArgumentError(f"config: a {type(config).__name__}; must be a Config (Buffer.get_dispatch_config)")
            return check_num_sms(config.num_sms, "config.num_sms")   # (odd: taken by Config, refused here, as DeepEP)
        return Buffer.num_sms if Buffer._num_sms_set else None

    def _tokens(self, x: Any, name: str = "x") -> Tuple[Any, Any]:
        """`x` as (tokens, scales or None), checked."""
        torch = torch_module()
        if isinstance(x, tuple):
            if len(x) != 2:
                raise InvalidArgumentError(f"{name}: a tuple of {len(x)}; must be a tensor or (fp8 tokens, scales)")
            tokens, scales = x
            require_tensor(tokens, f"{name}[0]", 2, self.device)
            if isinstance(scales, torch.Tensor) and scales.dim() == 1:   # (DeepEP takes a scale per token as [B] too)
                raise not_supported(f"{name}[1]", f"{scales.dtype} scales of shape {list(scales.shape)}",
                                    "FP8 rows move with float32 scales [B, H/128] or UE8M0 int32 words [B, H/512]")
            require_tensor(scales, f"{name}[1]", 2, self.device)
            if tokens.dtype != torch.float8_e4m3fn:
                raise InvalidArgumentError(f"{name}[0]: dtype {tokens.dtype}; the FP8 tokens must be torch.float8_e4m3fn")
            # DeepEP moves any scales unread; the groups move one float32 per 128 elements, or UE8M0
            # exponent bytes of 128-element blocks 4 to an int32 word (SGLang's DEEPGEMM_SCALE_UE8M0).
            b, h = int(tokens.shape[0]), int(tokens.shape[1])
            if scales.dtype == torch.float32:
                want = (b, -(-h // 128))
            elif scales.dtype == torch.int32:
                want = (b, -(-h // 512))
            else:
                raise InvalidArgumentError(f"{name}[1]: dtype {scales.dtype}; the scales must be torch.float32 (one per 128 "
                                           "elements) or torch.int32 (UE8M0: 4 exponent bytes a word)")
            if tuple(scales.shape) != want:
                raise not_supported(f"{name}[1]", f"{scales.dtype} scales of shape {list(scales.shape)}",
                                    f"FP8 rows move with float32 scales [B, H/128] or UE8M0 int32 words [B, H/512]: here {list(want)}")
            # (Column-major scales, as DeepGEMM wants them, are taken too: DeepEP reads any strides.)
            return require_contiguous(tokens, f"{name}[0]"), scales.contiguous()
        require_tensor(x, name, 2, self.device)
        return require_contiguous(x, name), None

    # -- the intranode (high-throughput) path -------------------------------------------------

    def get_dispatch_layout(self, topk_idx: Any, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False
                            ) -> Tuple[Any, None, Any, Any, EventOverlap]:
        """``(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
        is_token_in_rank [B, R] bool, event)`` of this rank's routing. A local computation on the
        current stream; ``allocate_on_comm_stream`` has no effect (there is no separate stream)."""
        self._check_open()
        experts = integer(num_experts, "num_experts", 1, 2**31 - 1)
        if experts % self.group_size:
            raise InvalidArgumentError(f"num_experts={experts}; must be a multiple of the number of ranks ({self.group_size})")
        routing(topk_idx, experts, self.device)
        async_finish = flag(async_finish, "async_finish")
        _events.wait(previous_event, self.device)
        per_rank, per_expert, in_rank = dispatch_layout(topk_idx, experts, self.group_size)
        event = _events.record(self.device) if async_finish else None
        return per_rank, None, per_expert, in_rank, EventOverlap(event)

    @_collective
    def dispatch(self, x: Union[Any, Tuple[Any, Any]], handle: Any = None, num_tokens_per_rank: Any = None,
                 num_tokens_per_rdma_rank: Any = None, is_token_in_rank: Any = None, num_tokens_per_expert: Any = None,
                 topk_idx: Any = None, topk_weights: Any = None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> Tuple[Any, Any, Any, Any, Any, EventOverlap]:
        """Sends each token once to every rank holding one of its experts; returns
        ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``.

        ``recv_x``: ``[N, hidden]`` (``(fp8, scales)`` when ``x`` is), rows in (source rank, token)
        order; ``recv_topk_idx``: local expert ids, -1 for experts on other ranks (``topk_idx``'s
        dtype); ``recv_topk_weights``: 0 where the id is -1; the list: rows per local expert, each
        rounded up to ``expert_alignment``. ``num_worst_tokens > 0``: N is that, rows past the
        received ones have id -1 and zeros, the list is empty. With ``handle`` (a cached dispatch,
        e.g. the backward pass of combine) the routing is the handle's and the result is
        ``(recv_x, None, None, None, None, event)``. The layout arguments must be
        :meth:`get_dispatch_layout`'s of ``topk_idx``: their shapes are checked, the values are
        derived from ``topk_idx`` again."""
        torch = torch_module()
        tokens, scales = self._tokens(x)
        dtype = "bf16" if scales is not None else group_dtype(tokens, "x")
        alignment = integer(expert_alignment, "expert_alignment", 1, 2**31 - 1)
        worst = integer(num_worst_tokens, "num_worst_tokens", 0, 2**31 - 1)
        if num_tokens_per_rdma_rank is not None:
            raise not_supported("num_tokens_per_rdma_rank", "a tensor", "internode dispatch is not offered; pass None")
        b = int(tokens.shape[0])
        args = dict(x=tokens, scales=scales, dtype=dtype, expert_alignment=alignment, num_worst_tokens=worst)
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise InvalidArgumentError("topk_idx/topk_weights: given with handle; a cached dispatch reuses the handle's routing")
            self._multiprocessors(config)   # (not used here: checked, as DeepEP asserts an even num_sms in cached mode too)
            # This rank's own arguments against its handle, checked here: a wrong one fails this rank
            # by its own name (the peers: PeerFailedError), not the round on every rank.
            self._own_handle(handle, "ht")
            if b != handle.record.tokens[handle.local]:
                raise InvalidArgumentError(f"x: {b} tokens; the handle's dispatch had {handle.record.tokens[handle.local]}")
            (recv_x, _, _, _, _), event = self._call("dispatch", _engine.ht_dispatch, previous_event, async_finish,
                                                     handle=handle, **args)
            return recv_x, None, None, None, None, event
        if topk_idx is None:
            raise not_supported("topk_idx", None, "dispatch by is_token_in_rank alone is not offered; pass topk_idx")
        if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
            raise InvalidArgumentError(
                "num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: a dispatch without handle needs all three "
                "(get_dispatch_layout's)")
        routing(topk_idx, 0, self.device)
        require_shape(topk_idx, "topk_idx", (b, None))
        require_shape(num_tokens_per_rank, "num_tokens_per_rank", (self.group_size,))
        require_shape(is_token_in_rank, "is_token_in_rank", (b, self.group_size))
        require_shape(num_tokens_per_expert, "num_tokens_per_expert", (None,))
        if num_tokens_per_expert.numel() % self.group_size:
            raise InvalidArgumentError(f"num_tokens_per_expert: shape {list(num_tokens_per_expert.shape)}; must be [num_experts], "
                                       f"a multiple of the number of ranks ({self.group_size})")
        if topk_weights is not None:
            require_tensor(topk_weights, "topk_weights", 2, self.device)
            require_shape(topk_weights, "topk_weights", tuple(topk_idx.shape))
            if topk_weights.dtype != torch.float32:
                raise InvalidArgumentError(f"topk_weights: dtype {topk_weights.dtype}; must be torch.float32")
            require_contiguous(topk_weights, "topk_weights")
        (recv_x, recv_idx, recv_w, counts, made), event = self._call(
            "dispatch", _engine.ht_dispatch, previous_event, async_finish, handle=None, topk_idx=topk_idx,
            topk_weights=topk_weights, experts=int(num_tokens_per_expert.numel()),
            multiprocessors=self._multiprocessors(config), **args)
        return recv_x, recv_idx, recv_w, counts, made, event

    @_collective
    def combine(self, x: Any, handle: Any, topk_weights: Any = None, bias: Any = None, config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> Tuple[Any, Any, EventOverlap]:
        """Sums each token's rows back from the ranks its dispatch sent it to (no weights applied);
        returns ``(combined_x [B, hidden], combined_topk_weights [B, K] or None, event)``.

        ``x``: ``[N, hidden]``, the rows of ``handle``'s dispatch (in its order). ``topk_weights``
        ``[N, K]``: combined_topk_weights[t, k] is the entry of the rank holding expert k (DeepEP
        adds every rank's entry; the two agree when the other ranks' entries are 0, as dispatch
        delivers them). ``bias``: a tensor or a pair (either may be None) of ``[B, hidden]``, added
        in float32 to the combined rows. ``config`` is not used here."""
        torch = torch_module()
        self._check_open()
        require_contiguous(require_tensor(x, "x", 2, self.device), "x")
        if config is not None and not isinstance(config, Config):   # (not used here; a wrong one is named, as dispatch names it)
            raise InvalidArgumentError(f"config: a {type(config).__name__}; must be a Config (Buffer.get_combine_config)")
        if config is not None:   # (nor its SMs; an odd count is refused, as DeepEP's combine asserts it even)
            check_num_sms(config.num_sms, "config.num_sms")
        self._own_handle(handle, "ht")
        # This rank's own arguments against its handle, checked here: a wrong one fails this rank by
        # its own name (the peers: PeerFailedError), not the round on every rank.
        record = handle.record
        b, rows, dtype = record.tokens[handle.local], record.rows[handle.local], group_dtype(x, "x")
        spec = record.combining(dtype, int(x.shape[1])).spec
        if dtype != spec.dtype:
            raise InvalidArgumentError(f"x: dtype {x.dtype}; the handle's dispatch combines {spec.dtype}")
        if tuple(x.shape) != (rows, spec.hidden):
            raise InvalidArgumentError(f"x: shape {list(x.shape)}; must be [{rows}, {spec.hidden}], the rows its dispatch returned")
        biases: List[Any] = list(bias) if isinstance(bias, (tuple, list)) else [bias]
        if len(biases) > 2:
            raise InvalidArgumentError(f"bias: {len(biases)} tensors; at most 2")
        for i, value in enumerate(biases):
            if value is not None:
                require_tensor(value, f"bias[{i}]", 2, self.device)
                require_shape(value, f"bias[{i}]", (b, x.shape[1]))
        if topk_weights is not None:
            require_tensor(topk_weights, "topk_weights", 2, self.device)
            if topk_weights.dtype != torch.float32:
                raise InvalidArgumentError(f"topk_weights: dtype {topk_weights.dtype}; must be torch.float32")
            if tuple(topk_weights.shape) != (rows, spec.top_k):
                raise InvalidArgumentError(f"topk_weights: shape {list(topk_weights.shape)}; must be [{rows}, {spec.top_k}], "
                                           "the recv_topk_weights its dispatch returned")
        (combined, weights), event = self._call(
            "combine", _engine.ht_combine, previous_event, async_finish, x=x, dtype=group_dtype(x, "x"), handle=handle,
            topk_weights=topk_weights, bias=biases)
        return combined, weights, event

    # -- the low-latency path -----------------------------------------------------------------

    @_collective
    def low_latency_dispatch(self, x: Any, topk_idx: Any, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Any = None, dispatch_wait_recv_cost_stats: Any = None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False
                             ) -> Tuple[Any, Any, Any, EventOverlap, Optional[Callable[[], None]]]:
        """Sends one row per (token, expert) to the expert's rank; returns ``(recv_x, recv_count,
        handle, event, hook)``.

        ``recv_x``: ``[L, R*Bmax, hidden]`` per local expert, rows ``[0, recv_count[e])`` valid, in
        (source rank, token) order; with ``use_fp8`` ``(e4m3 rows, scales)``:
        float32 ``[L, R*Bmax, hidden/128]`` (powers of two with ``round_scale``), or with
        ``use_ue8m0`` int32 words of four UE8M0 bytes ``[L, R*Bmax, ⌈hidden/512⌉]``; scales are
        column-major in their last two dimensions as DeepEP's. ``recv_x`` and ``recv_count`` are
        buffers of the group reused two low-latency dispatches later (DeepEP's two buffers).
        ``return_recv_hook=True``: the call only sends; ``hook()`` receives (a later call on the
        buffer receives first if the hook has not run). ``cumulative_local_expert_recv_stats``
        ``[L]`` int32 gets recv_count added."""
        torch = torch_module()
        self._check_open()
        if dispatch_wait_recv_cost_stats is not None:
            raise not_supported("dispatch_wait_recv_cost_stats", "a tensor", "the calls keep no wait-time statistics; pass None")
        require_contiguous(require_tensor(x, "x", 2, self.device), "x")
        routing(topk_idx, 0, self.device)
        bmax = integer(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1, 2**31 - 1)
        experts = integer(num_experts, "num_experts", 1, 2**31 - 1)
        if experts % self.group_size:
            raise InvalidArgumentError(f"num_experts={experts}; must be a multiple of the number of ranks ({self.group_size})")
        if x.shape[0] > bmax:
            raise InvalidArgumentError(f"x: {x.shape[0]} tokens; must be ≤ num_max_dispatch_tokens_per_rank ({bmax})")
        require_shape(topk_idx, "topk_idx", (x.shape[0], None))
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            require_tensor(stats, "cumulative_local_expert_recv_stats", 1, self.device)
            require_shape(stats, "cumulative_local_expert_recv_stats", (experts // self.group_size,))
            if stats.dtype != torch.int32:
                raise InvalidArgumentError(f"cumulative_local_expert_recv_stats: dtype {stats.dtype}; must be torch.int32")
        use_fp8, round_scale, use_ue8m0 = flag(use_fp8, "use_fp8"), flag(round_scale, "round_scale"), flag(use_ue8m0, "use_ue8m0")
        return_recv_hook = flag(return_recv_hook, "return_recv_hook")
        _engine.ll_fp8_mode(use_fp8, round_scale, use_ue8m0)
        (recv_x, count, made, split), event = self._call(
            "low_latency_dispatch", _engine.ll_dispatch, None, async_finish, x=x, dtype=group_dtype(x, "x"),
            topk_idx=topk_idx, max_tokens=bmax, experts=experts, stats=stats,
            fp8_flags=(use_fp8, round_scale, use_ue8m0), return_recv_hook=return_recv_hook)
        return recv_x, count, made, event, self._hook(split) if return_recv_hook else None

    @_collective
    def low_latency_combine(self, x: Any, topk_idx: Any, topk_weights: Any, handle: Any, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out: Any = None, combine_wait_recv_cost_stats: Any = None
                            ) -> Tuple[Any, EventOverlap, Optional[Callable[[], None]]]:
        """Brings each token's expert rows back and sums them weighted by ``topk_weights`` (entries
        whose ``topk_idx`` is -1 count for nothing); returns ``(combined_x [B, hidden], event,
        hook)``. ``x``: ``[L, R*Bmax, hidden]`` (``recv_x``'s shape, the combine's element type);
        ``topk_idx`` must be the dispatch's; ``out``: the ``[B, hidden]`` tensor to write.
        ``zero_copy`` has no effect: combine reads ``x`` where it is."""
        torch = torch_module()
        self._check_open()
        flag(zero_copy, "zero_copy")   # (no effect; a wrong one is named, as the other flags are)
        if flag(use_logfmt, "use_logfmt"):
            raise not_supported("use_logfmt", True, "combine moves rows in their element type; pass use_logfmt=False")
        return_recv_hook = flag(return_recv_hook, "return_recv_hook")
        if combine_wait_recv_cost_stats is not None:
            raise not_supported("combine_wait_recv_cost_stats", "a tensor", "the calls keep no wait-time statistics; pass None")
        require_contiguous(require_tensor(x, "x", 3, self.device), "x")
        routing(topk_idx, 0, self.device)
        require_tensor(topk_weights, "topk_weights", 2, self.device)
        if not topk_weights.is_floating_point():   # (DeepEP takes float32; other float types are converted, integers are a mistake)
            raise InvalidArgumentError(f"topk_weights: dtype {topk_weights.dtype}; must be torch.float32 (another floating "
                                       "dtype is converted)")
        self._own_handle(handle, "ll")
        # This rank's own arguments against its handle, checked here: a wrong one fails this rank by
        # its own name (the peers: PeerFailedError), not the round on every rank.
        b, k = handle.record.tokens[handle.local], int(handle.record.topk_idx[handle.local].shape[1])
        entry = handle.record.last
        require_shape(x, "x", tuple(entry.group.recv_shape))
        if group_dtype(x, "x") != entry.spec.dtype:
            raise InvalidArgumentError(f"x: dtype {x.dtype}; the handle's dispatch combines {entry.spec.dtype}")
        require_shape(topk_idx, "topk_idx", (b, k))
        require_shape(topk_weights, "topk_weights", (b, k))
        if out is not None:
            require_tensor(out, "out", 2, self.device)
            require_shape(out, "out", (b, int(x.shape[2])))
            if out.dtype != x.dtype:
                raise InvalidArgumentError(f"out: dtype {out.dtype}; must be {x.dtype}, x's (the combine's element type)")
            require_contiguous(out, "out")
            if overlaps(out, x):   # (the group names its own arguments: "out[0] ... must not overlap expert_outputs[0]")
                raise InvalidArgumentError(f"out: shares memory with x (out at {out.data_ptr():#x}, {out.numel() * out.element_size()} "
                                           f"bytes; x at {x.data_ptr():#x}, {x.numel() * x.element_size()} bytes); combine "
                                           "writes out while it reads x: pass a tensor of its own")
        (combined, split), event = self._call(
            "low_latency_combine", _engine.ll_combine, None, async_finish, x=x, dtype=group_dtype(x, "x"),
            topk_idx=topk_idx, topk_weights=topk_weights, handle=handle, out=out, return_recv_hook=return_recv_hook)
        return combined, event, self._hook(split) if return_recv_hook else None

    def get_next_low_latency_combine_buffer(self, handle: Any) -> Any:
        """A ``[L, R*Bmax, hidden]`` tensor to write the expert outputs into and pass as
        low_latency_combine's ``x`` (a fresh one: combine reads ``x`` where it is)."""
        self._check_open()
        self._own_handle(handle, "ll")
        entry = handle.record.last
        torch = torch_module()
        dtype = getattr(torch, {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[entry.spec.dtype])
        return torch.empty(tuple(entry.group.recv_shape), dtype=dtype, device=self.device)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to do: low-latency buffers need no cleaning between calls (arguments checked)."""
        self._check_open()
        integer(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1, 2**31 - 1)
        integer(hidden, "hidden", 1, 2**63 - 1)
        integer(num_experts, "num_experts", 1, 2**31 - 1)

    # -- not offered ----------------------------------------------------------------------------

    def get_local_buffer_tensor(self, *arguments: Any, **keywords: Any) -> Any:
        raise not_supported("get_local_buffer_tensor", "a call", "there is no raw communication buffer")

    def get_comm_stream(self) -> Any:
        raise not_supported("get_comm_stream", "a call", "calls run on the current stream; there is no separate stream")

    def internode_dispatch(self, *arguments: Any, **keywords: Any) -> Any:
        raise not_supported("internode_dispatch", "a call", "ranks must be on one node")

    def internode_combine(self, *arguments: Any, **keywords: Any) -> Any:
        raise not_supported("internode_combine", "a call", "ranks must be on one node")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        raise not_supported("low_latency_update_mask_buffer", rank_to_mask, "ranks are masked by timeouts only")

    def low_latency_query_mask_buffer(self, mask_status: Any) -> None:
        raise not_supported("low_latency_query_mask_buffer", "a call", "ranks are masked by timeouts only")

    def low_latency_clean_mask_buffer(self) -> None:
        raise not_supported("low_latency_clean_mask_buffer", "a call", "ranks are masked by timeouts only")
