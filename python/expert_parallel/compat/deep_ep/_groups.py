"""The expert_parallel groups behind a set of Buffers: one per shape and format, made on first use,
with the steps (handles) they lend, the staging tensors combine reads, and one list-per-rank view
of VirtualGroup and NCCLGroup calls."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional

from ... import VirtualGroup
from ...errors import InvalidArgumentError, InvalidUsageError, RankTimeoutError
from ._agreement import all_gather
from ._layout import torch_module


class Spec(NamedTuple):
    """What a group is made for, except its token capacity."""

    algorithm: str            # "ht" (flat layout) or "ll" (expert-major layout)
    experts: int
    hidden: int
    top_k: int
    dtype: str                # the tokens' and the combine's element type
    fp8: Optional[str]        # None, "float32" or "ue8m0"
    fp8_source: str           # "quantize" or "pass_through"
    multiprocessors: Optional[int]


class Dispatched(NamedTuple):
    """A dispatch's outputs, one entry per local rank (views of the group's buffers)."""

    tokens: List[Any]
    topk_idx: Optional[List[Any]]
    topk_weights: Optional[List[Any]]
    counts: List[Any]
    scales: Optional[List[Any]]
    stage: List[Any]          # per rank: where combine's expert outputs go
    layouts: Callable[[], List[Any]]


class SplitToken:
    """A pending send-only call's token (`Entry.begin_split`); `event`: recorded after its
    receiving half where a virtual rank's hook completed it, which the other ranks' hooks wait on
    (the hook ran it on the calling thread's current stream)."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event: Any = None


class Entry:
    """One group, the steps it lends out and the work left by a split (send-only) call."""

    def __init__(self, group: Any, spec: Spec, nccl: bool, owner: Optional["Groups"] = None) -> None:
        self.group, self.spec, self.nccl = group, spec, nccl
        self.owner = owner   # the Groups that made it: a Buffer takes only handles of its own set's groups
        self.max_tokens: int = group.max_tokens
        self._free: List[Any] = []
        self._stage: Optional[Any] = None
        self._grad_stage: Optional[Any] = None
        self._pending: Optional[object] = None   # the token of a send-only call not completed yet
        self._after: List[Callable[[], None]] = []
        self._closed = False   # its groups closed: a step given back now is released at once

    # -- steps ------------------------------------------------------------------------------

    def acquire(self) -> Any:
        """A step of the group's: a released one, or a new one."""
        while self._free:
            step = self._free.pop()
            if not step.released:
                return step
        return self.group.handle()

    def release(self, step: Any) -> None:
        """Gives `step` back (called when every rank's handle of its dispatch is gone)."""
        if len(self._free) < 64 and not self._closed:
            self._free.append(step)
        else:
            step.release()

    def release_kept_steps(self) -> None:
        """Releases the steps kept for reuse, and from now on every step given back (the group
        is closing: a handle that outlives it gives its step back when it goes)."""
        self._closed = True
        while self._free:
            self._free.pop().release()

    # -- split calls ------------------------------------------------------------------------

    def begin_split(self, after: List[Callable[[], None]]) -> object:
        """Marks a send-only call pending; `after` runs once it is completed. Returns its token."""
        token = SplitToken()
        self._pending, self._after = token, after
        return token

    def settle(self, token: Optional[object] = None) -> bool:
        """Completes the pending send-only call (only if it is `token`'s, when given) and runs the
        work left for after it; False when there was none to complete."""
        if self._pending is None or (token is not None and token is not self._pending):
            return False
        self.group.complete()
        after, self._pending, self._after = self._after, None, []
        for work in after:
            work()
        return True

    # -- calls ------------------------------------------------------------------------------

    def stage(self, ranks: int) -> Any:
        """Per-rank tensors shaped like the receive buffer, for combine's expert outputs (HT)."""
        if self._stage is None:
            torch = torch_module()
            dtype = getattr(torch, {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[self.spec.dtype])
            with torch.inference_mode(False):   # (kept for later calls, in any mode: _arrays.outside_inference_mode)
                self._stage = torch.zeros((ranks,) + tuple(self.group.recv_shape), dtype=dtype, device=self.group.device)
        return self._stage

    def grad_stage(self, ranks: int) -> Any:
        """Per-rank tensors shaped like the received topk_weights, for combine's weights (HT)."""
        if self._grad_stage is None:
            torch = torch_module()
            with torch.inference_mode(False):
                self._grad_stage = torch.zeros((ranks,) + tuple(self.group.recv_routing_shape), dtype=torch.float32,
                                               device=self.group.device)
        return self._grad_stage

    def dispatch(self, xs: List[Any], topk_idx: Optional[List[Any]], weights: Optional[List[Any]], step: Any,
                 scales: Optional[List[Any]], send_only: bool) -> Dispatched:
        group = self.group
        if self.nccl:
            out = group.dispatch(xs[0], None if topk_idx is None else topk_idx[0], None if weights is None else weights[0], handle=step,
                                 send_only=send_only, scales=None if scales is None else scales[0])
            listed = lambda value: None if value is None else [value]  # noqa: E731
            return Dispatched([out.tokens], listed(out.topk_idx), listed(out.topk_weights), [out.expert_counts],
                              listed(out.scales), [out.expert_outputs], lambda: [out.layout])
        out = group.dispatch(xs, topk_idx, weights, handle=step, send_only=send_only, scales=scales)
        stage = list(self.stage(group.ranks)) if self.spec.algorithm == "ht" else [None] * group.ranks
        return Dispatched(out.tokens, out.topk_idx, out.topk_weights, [out.expert_counts[i] for i in range(group.ranks)],
                          out.scales, stage, lambda: out.layout)

    def combine(self, expert_outputs: List[Any], step: Any, outs: List[Any], *, grads: Optional[List[Any]] = None,
                grad_outs: Optional[List[Any]] = None, weights: Optional[List[Any]] = None,
                send_only: bool = False) -> List[Callable[[], None]]:
        """Combines into `outs` (and `grad_outs`), with no copy; `weights`: the forward LL combine's
        (None: the dispatch's). Returns the work to run once a send-only call is completed (none:
        the group writes `outs` itself)."""
        group = self.group
        direction = "forward" if grads is None else "backward"
        if not self.nccl:
            out = outs if grads is None else (outs, grad_outs)
            group.combine(expert_outputs, step, direction=direction, weight_gradients=grads, out=out, send_only=send_only,
                          topk_weights=weights)
            return []
        group.combine(expert_outputs[0], step, direction=direction, weight_gradients=None if grads is None else grads[0],
                      out=outs[0] if grads is None else (outs[0], grad_outs[0]), send_only=send_only,
                      topk_weights=None if weights is None else weights[0])
        return []


def _capacity(tokens: int) -> int:
    """A group's token capacity for `tokens`: the next power of two (at least 8)."""
    capacity = 8
    while capacity < tokens:
        capacity *= 2
    return capacity


def disagreement(everyone: List[Any]) -> Optional[str]:
    """What keeps the ranks from making one group together, from every rank's (spec fields,
    capacity, error) in rank order — the same words on every rank — or None: the first rank's
    error, else the first rank whose group differs from rank 0's."""
    for rank, (_, _, error) in enumerate(everyone):
        if error is not None:
            return f"rank {rank}: {error}"
    names = Spec._fields + ("max_tokens",)
    first = everyone[0][0] + (everyone[0][1],)
    for rank, (spec, capacity, _) in enumerate(everyone):
        theirs = tuple(spec) + (capacity,)
        if theirs != first:
            differ = ", ".join(f"{name} {a!r} on rank 0, {b!r} on rank {rank}" for name, a, b in zip(names, first, theirs) if a != b)
            return (f"the ranks ask for different groups ({differ}): every rank must make the same call, with the same "
                    "num_experts, hidden size, top-k, dtype, FP8 settings and num_sms")
    return None


class Groups:
    """The groups of one set of Buffers, made on first use and kept per :class:`Spec`.

    ``process_group``: None for virtual ranks (VirtualGroups of ``ranks`` ranks on ``device``),
    else the torch.distributed group whose ranks are NCCLGroups (``device`` "cuda..."), one per
    process. ``fixed_tokens``: a fixed high-throughput capacity (NCCL ranks, which cannot agree
    on a new one without communicating); None: capacities grow with the calls."""

    def __init__(self, *, ranks: int, device: str, timeout: float, process_group: Any = None,
                 fixed_tokens: Optional[int] = None) -> None:
        self.ranks, self.device, self.timeout = ranks, device, timeout
        self.process_group = process_group
        self.nccl = process_group is not None and device != "cpu"
        self.fixed_tokens = fixed_tokens
        self._entries: Dict[Any, Entry] = {}   # per Spec, or (Spec, exact capacity)
        self.broken: Optional[str] = None   # why no more agreement can run (a timed-out one left a collective pending)
        self._all: List[Entry] = []

    @property
    def local_ranks(self) -> int:
        """How many ranks one call of these groups drives (the length of every per-rank list)."""
        return 1 if self.nccl else self.ranks

    def entry(self, spec: Spec, tokens: int, exact: Optional[int] = None) -> Entry:
        """The group for `spec` holding `tokens` tokens per rank; `exact`: a capacity that must be
        exactly this (low latency: DeepEP's num_max_dispatch_tokens_per_rank)."""
        key = spec if exact is None else (spec, exact)
        current = self._entries.get(key)
        if current is not None and current.max_tokens >= tokens:
            return current
        error = None
        if exact is not None:
            capacity = exact
        elif self.fixed_tokens is not None:
            if tokens > self.fixed_tokens:
                error = (f"x: {tokens} tokens on a rank; must be ≤ max_tokens_per_rank ({self.fixed_tokens}), the capacity "
                         "of this multi-process Buffer: pass a larger max_tokens_per_rank= to Buffer")
            capacity = self.fixed_tokens
        else:
            capacity = _capacity(tokens)
        if self.nccl and current is None:
            # Making an NCCL group is collective: the ranks first agree on it, so that a rank's
            # error, or ranks asking for different groups, fail every rank by name rather than
            # leave the others waiting in the group's making. (Ranks of which only some ask to
            # make a group — one already has the group another asks for, or one failed its own
            # checks first — wait at most the Buffer's timeout: the others do not come.)
            self._agree_to_make(spec, capacity, error)
        elif error is not None:
            raise InvalidArgumentError(error)
        made = Entry(self._make(spec, capacity), spec, self.nccl, self)
        self._entries[key] = made   # an older, smaller group stays alive while handles of it do
        self._all.append(made)
        return made

    def _agree_to_make(self, spec: Spec, capacity: int, error: Optional[str]) -> None:
        """All-gathers every rank's (spec, capacity, error) over the process group and raises
        `disagreement`'s error on every rank where there is one; a rank that does not come within
        the Buffer's timeout (its call failed before, or it made another) is a RankTimeoutError."""
        if self.broken is not None:
            raise InvalidUsageError(self.broken)
        try:
            everyone = all_gather(self.process_group, (tuple(spec), capacity, error), self.timeout,
                                  "the ranks' agreement on a new group (a call's first of its shape)")
        except RankTimeoutError as timeout:
            # A collective is left pending on the process group: a later one would pair with it.
            self.broken = (f"this Buffer's process group has a collective left pending since an agreement timed out "
                           f"({timeout}); make a new process group and Buffer (NCCL's watchdog may end the process)")
            raise
        message = disagreement(everyone)
        if message is not None:
            raise InvalidArgumentError(message)

    def _make(self, spec: Spec, capacity: int) -> Any:
        layout = "flat" if spec.algorithm == "ht" else "expert_major"
        settings: Dict[str, Any] = dict(experts=spec.experts, hidden=spec.hidden, top_k=spec.top_k, max_tokens=capacity,
                                        algorithm=spec.algorithm, layout=layout, dtype=spec.dtype, timeout=self.timeout)
        if spec.multiprocessors is not None and self.device != "cpu":
            settings["multiprocessors"] = spec.multiprocessors
        if spec.fp8 is not None:
            settings.update(fp8=spec.fp8, fp8_source=spec.fp8_source)
        if self.nccl:
            from ... import NCCLGroup

            return NCCLGroup.from_process_group(self.process_group, **settings)
        return VirtualGroup(self.ranks if self.process_group is None else 1, device=self.device, buffer_slots=2, **settings)

    def close(self) -> None:
        """Closes every group, releasing the steps it kept for reuse first: a group's library
        object lives until its last step is released, and an NCCL group's teardown is collective,
        so every rank's goes here rather than whenever its garbage collector runs (a step that
        DeepEP handles still hold goes when they do)."""
        for made in self._all:
            made.release_kept_steps()
            made.group.close()
        self._entries.clear()
        self._all.clear()
