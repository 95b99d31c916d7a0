"""Groups and steps as the integers the custom ops take.

torch.library ops take tensors and numbers, never Python objects, so a group is registered under
an int id (:func:`register`) and a step travels through the graph as a *step token*: a 0-dim
int64 CPU tensor holding the step's number. The token is an output of the dispatch op and an
input of every op that reuses the step's routing (combine, the backward dispatch and combine), so
the graph's data flow orders them. The step's handle stays live as long as the token object the
dispatch op returned does, which the autograd graph that recorded the step holds (_autograd: on
``ctx``, besides the saved token, which a saved-tensor hook may replace by a copy), and goes back
to the group's pool of free handles when it is freed. A copy of a token keeps nothing live: once
the original is gone, the copy's number names no live step, an error (numbers are never reused,
so a stale token never names another step). No handle is overwritten while a token names it."""

from __future__ import annotations

import ctypes
import itertools
import threading
import weakref
from typing import Any, Dict, List, Tuple

import torch

from .. import _library
from ..errors import InactiveRankError, InvalidArgumentError, InvalidUsageError
from ..group import Handle, VirtualGroup
from ..nccl_group import NCCLGroup

_ELEMENT_TYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
_ids = itertools.count(1)
_steps = itertools.count(1)   # step numbers, unique across groups: another group's token names nothing here
_entries: Dict[int, "Entry"] = {}
_lock = threading.Lock()


class Entry:
    """A registered group (id `number`): its handle pool and its live steps (step number -> handle)."""

    def __init__(self, number: int, group: Any, zero_fill: bool = True) -> None:
        self.id = number
        self.group = group
        #: an NCCLGroup: this process's one rank (the ops' tensors have no leading rank dimension)
        self.one_rank = isinstance(group, NCCLGroup)
        #: whether the ops' dispatch outputs start as zeros (else rows outside the received zones are unspecified)
        self.zero_fill = zero_fill
        self.free: List[Handle] = []
        self.live: Dict[int, Handle] = {}
        self._tokens: Dict[int, "weakref.ref[torch.Tensor]"] = {}   # live step number -> its token's weak reference
        self._retired: List[Handle] = []   # handles of steps retired while another thread held the group's lock
        #: unregistered: no new steps; the live ones run their calls (backward passes) until they end
        self.closed = False
        #: _library.mask_changes when every rank was last found active (0: none masked in this process yet)
        self.mask_seen = 0
        # A CPU group's mask, read every call (require_active): where the library writes it, and its value with every rank active.
        self._mask = ctypes.c_uint64()
        self._mask_address = ctypes.addressof(self._mask)
        self._all = (1 << group.ranks) - 1
        self._read_mask = _library.addresses_entry("epGroupGetActiveRanks")
        #: a CPU VirtualGroup: its mask is read every call (require_active)
        self.reads_mask = not self.one_rank and group._device == -1
        # What the ops check their tensors against, found once: the leading dimensions ((R,), or
        # none for an NCCL rank), the group's device ordinal (-1: the CPU), its token dtype, the
        # shapes of the received tokens and routing (None where the layout receives none).
        self.lead: Tuple[int, ...] = () if self.one_rank else (group.ranks,)
        self.device: int = group._device
        self.element = _ELEMENT_TYPES.get(group.dtype)   # the token dtype
        self.elements = (self.element,)   # as _ops._require takes it
        # The group's sizes, and the dimensions of the ops' token arrays (the dispatch's x: [R, B, hidden]).
        self.hidden, self.top_k, self.max_tokens = group.hidden, group.top_k, group.max_tokens
        self.x_dims = len(self.lead) + 2
        self.received_shape = self.lead + tuple(group.recv_shape)
        routing = group.recv_routing_shape
        self.routing_shape = None if routing is None else self.lead + tuple(routing)
        # The dispatch ops' outputs: the received routing (``[R, 0]`` where the layout receives
        # none), the rows per local expert, and whether the received rows start as zeros.
        self.received_routing_shape = self.lead + (0,) if routing is None else self.routing_shape
        self.counts_shape = self.lead + (group.local_experts,)
        self.fills = zero_fill   # (an NCCL rank's rows too: only the received zones are copied from its slot)
        # Whether the received routing starts as zeros: an NCCL rank's is copied whole from its slot.
        self.fills_routing = zero_fill and not self.one_rank

    def start(self) -> Tuple[Handle, torch.Tensor]:
        """A handle for a new step and the step's token; the handle returns to the pool when the
        token is freed."""
        with self.group._lock:
            self._settle_retired()
            if self.closed:
                raise InvalidUsageError(f"group: exchange {self.id} is closed (its live steps' backward passes still run); "
                                        "make a new Exchange(group) for new steps")
            handle = self.free.pop() if self.free else self.group.handle()
            number = next(_steps)
            self.live[number] = handle
        token = torch.scalar_tensor(number, dtype=torch.int64)   # (torch.tensor parses its argument: twice the cost)
        # Its weak reference (kept here until the step retires) retires the step when the token is
        # freed: a plain weakref with a callback, a tenth of weakref.finalize's cost per step.
        self._tokens[number] = weakref.ref(token, lambda _, number=number: self._retire(number))
        return handle, token

    def step(self, token: torch.Tensor) -> Handle:
        """The live handle that `token` names."""
        if token.dtype != torch.int64 or token.dim() != 0:   # (int() of several values, or of NaN, raises its own error)
            raise InvalidArgumentError(f"step: a {token.dtype} tensor of shape {list(token.shape)}; must be the step token "
                                       "dispatch returned (a 0-dim torch.int64 tensor)")
        return self.handle_of(token)

    def handle_of(self, token: torch.Tensor) -> Handle:
        """`step` of a token known to be a 0-dim int64 tensor (Exchange.combine has checked it)."""
        number = int(token)
        handle = self.live.get(number)
        if handle is None:
            holder = next((e for e in list(_entries.values()) if number in e.live), None)
            if holder is not None:   # (a live step of another exchange: combine it through that one)
                raise InvalidUsageError(f"step: token {number} is a step of exchange {holder.id} (of {holder.group!r}), not of "
                                        f"exchange {self.id}; pass the Dispatched to the combine of the exchange whose "
                                        "dispatch returned it")
            raise InvalidUsageError(
                f"step: token {number} names no live step of group {self.group!r}; pass the step token that this "
                "group's dispatch op returned while it, or the autograd graph that recorded the step, is still "
                "referenced (a copy of a token does not keep its step live)")
        self.require_active()
        return handle

    def require_active(self) -> None:
        """Raises InactiveRankError while a rank of the group is masked: LL's selection rows
        assume every rank's rows, and a masked rank's outputs would be left unwritten. A CPU
        VirtualGroup's mask is read every call (host memory: no synchronisation), so a rank masked
        past the package (epGroupDeactivateRank through the raw C ABI) is seen too. A GPU group's
        is read (a synchronisation) only once a call of this process has masked a rank or met or
        seen a masked one (_library.mask_changes) since every rank was last found active: the data
        path reads two numbers."""
        changes = _library.mask_changes
        if self.reads_mask:
            handle = self.group._group
            if handle and not self._read_mask(handle.value, self._mask_address) and self._mask.value == self._all:
                self.mask_seen = changes
                return
        elif changes == self.mask_seen:
            return
        active = self.group.active_ranks
        if len(active) < self.group.ranks:
            masked = [r for r in range(self.group.ranks) if r not in active]
            remedy = ("group.clean() them, then dispatch again (a step live when the mask changed cannot be combined)"
                      if hasattr(self.group, "clean") else
                      "an NCCL rank's group cannot unmask them: close the group on every rank and make a new one")
            raise InactiveRankError(
                f"group: rank(s) {masked} masked inactive; the torch ops need every rank active (LL's gradients assume "
                f"every rank's rows, and a masked rank's outputs would be left unwritten): {remedy}")
        self.mask_seen = changes

    def _retire(self, number: int) -> None:
        # A weak reference's callback: it runs on whichever thread frees the token (or collects
        # it), so it never waits for the group's lock, which another thread may hold while it
        # waits for this one. The step leaves `live` at once (dict operations are atomic); its
        # handle goes to the pool (or is released) under the lock, now if it is free, else by the
        # lock's next holder (start, close).
        self._tokens.pop(number, None)
        handle = self.live.pop(number, None)
        if handle is None:
            return
        handle.torch_routing = None   # (a pooled handle keeps no routing alive)
        self._retired.append(handle)
        lock = self.group._lock
        if lock.acquire(blocking=False):
            try:
                self._settle_retired()
            finally:
                lock.release()
        elif self.closed:   # (no start() comes: its handle is released by its own finalizer, never waiting)
            self._forget()

    def _settle_retired(self) -> None:
        """The retired steps' handles back to the pool, or released once the entry is closed (the
        group's lock held)."""
        while self._retired:
            handle = self._retired.pop()
            if not self.closed:
                self.free.append(handle)
                continue
            handle.release()
            self._forget()

    def close(self, wait: bool = True) -> None:
        lock = self.group.lock
        if not lock.acquire(blocking=wait):
            # (an Exchange's finalizer on a thread while another holds the lock: no new steps; the
            # pooled handles' steps are released by their own finalizers once the entry goes)
            self.closed = True
            self._forget()
            return
        try:
            self.closed = True
            self._settle_retired()
            for handle in self.free:
                handle.release()
            self.free.clear()
            self._forget()
        finally:
            lock.release()

    def _forget(self) -> None:
        """Unregisters a closed entry once its last live step has ended."""
        if not self.live:
            _entries.pop(self.id, None)


def register(group: Any, zero_fill: bool = True) -> int:
    """Registers `group` (a :class:`~expert_parallel.VirtualGroup`, or an
    :class:`~expert_parallel.NCCLGroup` but for LL expert-major) and returns its id for the ops;
    `zero_fill`: Entry.zero_fill."""
    if not isinstance(group, (VirtualGroup, NCCLGroup)):
        raise InvalidArgumentError(
            f"group: a {type(group).__name__}; the torch ops take a VirtualGroup (R ranks in this process) or an NCCLGroup "
            "(this process's rank)")
    if not group._group:   # (its ops would fail at the first call, naming no exchange)
        raise InvalidUsageError(f"group: {group!r} is closed; register an open group")
    if isinstance(group, NCCLGroup) and group.layout == "expert_major":
        raise InvalidArgumentError(
            "group.layout='expert_major' of an NCCLGroup: its combine's gradients need the source weights at the rows' "
            "ranks and the expert outputs at the tokens' ranks, which only a VirtualGroup holds; use layout 'rank_major' "
            "(LL) or an HT layout")
    if group.dtype not in ("bf16", "f16", "f32"):
        raise InvalidArgumentError(f"group.dtype={group.dtype!r}; autograd needs 'bf16', 'f16' or 'f32' tokens")
    if group.fp8 is not None:
        raise InvalidArgumentError(f"group.fp8={group.fp8!r}; the torch ops move unquantised rows (fp8=None)")
    with _lock:
        number = next(_ids)
        _entries[number] = Entry(number, group, zero_fill)
    return number


def unregister(number: int, wait: bool = True) -> None:
    """Closes group `number`: it starts no new steps, its free handles are released now, and live
    steps go on serving their ops (a backward pass after ``with Exchange(group)``) until they end,
    each releasing its handle; the id is forgotten with the last."""
    found = _entries.get(number)
    if found is not None:
        found.close(wait)


def entry(number: int) -> Entry:
    # int(): under torch.compile(dynamic=True) the id may arrive as a SymInt; this specialises the
    # graph on it (a group's id is a constant of the graph, as its shapes are).
    number = int(number)
    found = _entries.get(number)
    if found is None:
        raise InvalidArgumentError(f"group: id {number} is not registered (or was closed and its steps have ended); make "
                                   "one with expert_parallel.torch.Exchange(group)")
    return found
