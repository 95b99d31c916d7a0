"""How the ranks of one set of Buffers meet: a rendezvous for R virtual ranks in one process (one
thread per rank), and the trivial one for a process that is its own rank."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any, Callable, List, Optional

from ..._config import seconds
from ...errors import InvalidArgumentError, InvalidUsageError, PeerFailedError, RankTimeoutError

Run = Callable[[List[Any]], List[Any]]


class Failed:
    """The payload of a rank whose call failed before it could join its round (its own argument
    checks): the rank takes its round all the same, so the ranks stay in step, and the round runs
    no work. ``error`` is what the rank raises."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Solo:
    """This process is the only rank the engine drives (a torch.distributed rank): a collective
    call runs at once with this rank's payload (a :class:`Failed` one raises its error)."""

    ranks = 1

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def call(self, rank: int, name: str, payload: Any, run: Run) -> Any:
        if isinstance(payload, Failed):
            raise payload.error
        with self.lock:
            return run([payload])[0]


class _Round:
    __slots__ = ("names", "payloads", "results", "arrived", "collected", "done", "running", "error")

    def __init__(self, ranks: int) -> None:
        self.names: List[Optional[str]] = [None] * ranks
        self.payloads: List[Any] = [None] * ranks
        self.results: List[Any] = []
        self.arrived = self.collected = 0
        self.done = self.running = False
        self.error: Optional[BaseException] = None


class Rendezvous:
    """The meeting point of R virtual ranks, each calling from its own thread.

    A rank's n-th collective call joins round n. The last rank to arrive runs the round's work
    once for all ranks (one group call covering every rank) and hands each rank its result; the
    others wait. A rank that waits ``timeout`` seconds for ranks that have not arrived makes the
    round fail on every rank with :class:`expert_parallel.RankTimeoutError` naming the missing ranks
    (a late rank gets the same error); ranks calling different methods in one round get
    :class:`expert_parallel.InvalidUsageError`. An error of the work reaches every rank.

    A rank whose call fails before it joins (its own argument checks) arrives with a
    :class:`Failed` payload: it takes its round all the same and raises its own error at once,
    without waiting; the round then runs no work and fails on every other rank at once (those
    waiting in it and those still to come) with :class:`expert_parallel.PeerFailedError` naming the
    failing rank, its call and its error. Every call counts, a failed one too: ranks that make the
    same calls stay in step, and their next calls meet as before; a rank that makes a call the
    others do not (a retry of its failed call alone) is a call ahead of them from then on."""

    def __init__(self, ranks: int, timeout: float) -> None:
        self.ranks = ranks
        self.timeout = timeout
        #: serialises the engine's work (rounds and receive hooks)
        self.lock = threading.RLock()
        self._cond = threading.Condition()
        self._issued = [0] * ranks
        self._rounds: dict = {}

    def call(self, rank: int, name: str, payload: Any, run: Run) -> Any:
        failed = isinstance(payload, Failed)
        with self._cond:
            number = self._issued[rank]
            self._issued[rank] += 1
            round_ = self._rounds.get(number)
            if round_ is None:
                round_ = self._rounds[number] = _Round(self.ranks)
            late = round_.done   # the round failed before this rank came: it gets the round's error
            if not late:
                round_.names[rank], round_.payloads[rank] = name, payload
                round_.arrived += 1
                if failed:   # (the work cannot be running: it starts once every rank has arrived)
                    error = payload.error
                    peers = PeerFailedError(
                        f"virtual rank {rank}'s call {number} ({name}) failed before it began, so no rank's call ran: "
                        f"{type(error).__name__}: {error}")
                    peers.__cause__ = error
                    self._end(round_, peers)
            last = not late and not failed and round_.arrived == self.ranks
            if last:
                round_.running = True
        if failed:   # this rank's own error, at once (a late one too: its round failed before it came)
            self._collect(round_, number, rank, counted_only=True)
            raise payload.error
        if last:
            self._run(round_, run)
        elif not late:
            self._wait(round_, number)
        return self._collect(round_, number, rank)

    def _run(self, round_: _Round, run: Run) -> None:
        try:
            first = round_.names[0]
            for r, name in enumerate(round_.names):
                if name != first:
                    raise InvalidUsageError(
                        f"rank {r} called {name} while rank 0 called {first} in the same round; every rank makes the "
                        "same calls in the same order")
            with self.lock:
                results = run(round_.payloads)
            round_.results = list(results)
        except BaseException as error:  # every rank raises it
            round_.error = error
        with self._cond:
            self._end(round_)

    def _end(self, round_: _Round, error: Optional[BaseException] = None) -> None:
        """Ends `round_` for every rank (with `error`, where given); the caller holds `_cond`."""
        if error is not None:
            round_.error = error
        round_.payloads = []
        round_.done = True
        self._cond.notify_all()

    def _wait(self, round_: _Round, number: int) -> None:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while not round_.done:
                left = deadline - time.monotonic()
                if left <= 0 and not round_.running:
                    missing = [r for r, n in enumerate(round_.names) if n is None]
                    self._end(round_, RankTimeoutError(
                        f"virtual ranks {missing} did not make call {number} ({next(n for n in round_.names if n)}) "
                        f"within timeout={self.timeout} s; every rank's thread must make the same calls"))
                    break
                self._cond.wait(left if left > 0 else 0.05)

    def _collect(self, round_: _Round, number: int, rank: int, counted_only: bool = False) -> Any:
        with self._cond:
            round_.collected += 1
            if round_.collected == self.ranks:
                self._rounds.pop(number, None)
            if counted_only:
                return None
            if round_.error is not None:
                raise copy.copy(round_.error) from round_.error
            result, round_.results[rank] = round_.results[rank], None
            return result


def run_ranks(buffers: List[Any], function: Callable[[Any], Any], timeout: Optional[float] = None) -> List[Any]:
    """Runs ``function(buffer)`` for every virtual rank's Buffer on a thread of its own and returns
    the results in rank order. Where ranks raise, the root cause is raised: the error of the lowest
    rank whose error is its own (neither a :class:`expert_parallel.RankTimeoutError` nor a
    :class:`expert_parallel.PeerFailedError`, which only report another rank's), else the lowest
    rank's."""
    if timeout is not None:   # (threading's join raised ValueError for NaN, OverflowError for infinity)
        wait = seconds(timeout, "timeout")
        if not 0 <= wait <= threading.TIMEOUT_MAX:
            raise InvalidArgumentError(f"timeout={timeout!r}; must be None or seconds in [0, {threading.TIMEOUT_MAX:g}]")
    results: List[Any] = [None] * len(buffers)
    errors: List[Optional[BaseException]] = [None] * len(buffers)

    def work(i: int) -> None:
        try:
            results[i] = function(buffers[i])
        except BaseException as error:
            errors[i] = error

    threads = [threading.Thread(target=work, args=(i,), name=f"deep_ep virtual rank {i}") for i in range(len(buffers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    stuck = [i for i, thread in enumerate(threads) if thread.is_alive()]
    if stuck:
        raise RankTimeoutError(f"virtual ranks {stuck} still running after timeout={timeout} s")
    raised = [error for error in errors if error is not None]
    if raised:
        raise next((e for e in raised if not isinstance(e, (RankTimeoutError, PeerFailedError))), raised[0])
    return results
