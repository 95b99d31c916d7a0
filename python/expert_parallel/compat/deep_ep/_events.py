"""EventOverlap: DeepEP's wrapper of a CUDA event recorded after a call (None on the CPU)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

from ...errors import InvalidArgumentError


class EventOverlap:
    """A CUDA event recorded after a communication call (``async_finish=True``), or None.

    ``current_stream_wait()`` makes the current CUDA stream wait for it; with no event (the CPU
    backend, whose calls finish before they return, or ``async_finish=False``) it does nothing.
    As a context manager it waits on exit, so the body overlaps the call."""

    def __init__(self, event: Any = None, extra_tensors: Optional[Tuple[Any, ...]] = None) -> None:
        self.event = event
        #: tensors kept alive until the event is waited for
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """The current stream waits for the event (nothing to wait for without one)."""
        event = _cuda_event(self.event, "EventOverlap.event")
        if event is not None:
            import torch

            torch.cuda.current_stream().wait_event(event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.current_stream_wait()


def record(device: str) -> Any:
    """A CUDA event recorded on the current stream of `device` (None for "cpu")."""
    if device == "cpu":
        return None
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(torch.device(device)))
    return event


_MOST_NESTED = 8   # wrappers (EventOverlap(EventHandle(...)) and the like) at most; past this an object's .event leads on forever (a mock, a cycle)


def _cuda_event(event: Any, name: str) -> Any:
    """The torch.cuda.Event inside `event` (an EventOverlap, a utils.EventHandle, either holding
    the other, or the event itself), or None; anything else raises the error naming `name` (a
    wrong value reached torch's wait_event, whose error named none; an object whose ``.event``
    never ends, a MagicMock, looped forever)."""
    given = event
    for _ in range(_MOST_NESTED + 1):   # up to _MOST_NESTED wrappers unwrapped, then what they hold looked at
        if event is None or not hasattr(event, "event"):
            break
        event = event.event
    else:
        raise InvalidArgumentError(f"{name}: a {type(given).__name__} whose .event nests more than {_MOST_NESTED} deep; must be "
                                   "an EventOverlap, an EventHandle, a CUDA event or None")
    if event is None:
        return None
    import torch

    kinds = (torch.cuda.Event,) + ((torch.Event,) if hasattr(torch, "Event") else ())
    if not isinstance(event, kinds):
        raise InvalidArgumentError(
            f"{name}: a {type(given).__name__} ({given!r:.100}); must be an EventOverlap, an EventHandle, a CUDA event or None")
    return event


def wait(event: Any, device: str) -> None:
    """The current stream of `device` waits for `event` (an EventOverlap, an EventHandle, a CUDA
    event or None)."""
    event = _cuda_event(event, "previous_event")
    if event is None:
        return
    import torch

    if device != "cpu":
        torch.cuda.current_stream(torch.device(device)).wait_event(event)
