"""A dispatch's handle: what each rank gets back, and the record its ranks share."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ._groups import Entry


def _give_back(steps: Dict[Entry, Any]) -> None:
    for entry, step in steps.items():
        entry.release(step)
    steps.clear()


class Record:
    """One dispatch (and the cached dispatches and combines that reuse it), shared by the handles
    of all its ranks: its routing, the group steps that hold it, and what combine needs. The steps
    go back to their groups when the last handle is gone."""

    def __init__(self, kind: str, entry: Entry, step: Any, tokens: List[int], topk_idx: List[Any],
                 topk_weights: List[Any]) -> None:
        self.kind = kind                      # "ht" or "ll"
        self.tokens = tokens                  # per local rank: B
        self.topk_idx = topk_idx              # per local rank: the routing dispatched
        self.topk_weights = topk_weights      # per local rank: the weights sent (HT) or combine's (LL)
        self.steps: Dict[Entry, Any] = {entry: step}
        self.last = entry                     # the group of the latest dispatch of this routing
        self.received: Optional[List[int]] = None   # HT: rows received per local rank
        self.rows: Optional[List[int]] = None       # HT: rows the handle has per local rank (num_worst_tokens, else received)
        self.stage: List[Any] = []            # LL, per local rank: where combine's expert outputs go
        self.stages: Dict[Entry, List[Any]] = {}   # HT: the same, per group this routing was dispatched in
        self.idx_versions: List[int] = []     # LL: each routing tensor's version at the dispatch

    def __del__(self) -> None:
        try:
            _give_back(self.steps)
        except Exception:   # (at interpreter exit the library may be gone already)
            pass

    def step_in(self, entry: Entry) -> Any:
        """This routing's step in `entry`'s group, or None when it has none yet."""
        return self.steps.get(entry)

    def combining(self, dtype: str, hidden: int) -> Entry:
        """HT: the group a combine of `dtype` rows of `hidden` runs in: the latest dispatch's, or
        else the latest earlier one's that moved such rows (a cached dispatch of side data, or of
        another format, comes between a dispatch and its combine). The latest dispatch's where
        none did: the combine then names what that one combines."""
        if self.last.spec.dtype == dtype and self.last.spec.hidden == hidden:
            return self.last
        for entry in reversed(list(self.stages)):
            if entry.spec.dtype == dtype and entry.spec.hidden == hidden:
                return entry
        return self.last


class DispatchHandle:
    """The handle a dispatch returns to one rank (DeepEP's opaque ``handle``): pass it to combine,
    or to dispatch for a cached dispatch with the same routing."""

    __slots__ = ("record", "rank", "local", "__weakref__")

    def __init__(self, record: Record, rank: int, local: int) -> None:
        self.record = record
        self.rank = rank      # the rank's number in its group
        self.local = local    # its index in the record's per-rank lists

    @property
    def num_recv_tokens(self) -> Optional[int]:
        """High-throughput: the rows this rank received (None for low latency); with
        ``num_worst_tokens`` the handle has that many rows, of which these are the received ones."""
        received = self.record.received
        return None if received is None else received[self.local]

    def __repr__(self) -> str:
        return f"DispatchHandle({self.record.kind}, rank={self.rank}, tokens={self.record.tokens[self.local]})"
