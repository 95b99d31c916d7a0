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
        event = _cuda_event(self.event)
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


def _cuda_event(event: Any) -> Any:
    """The torch.cuda.Event inside `event` (an EventOverlap, a utils.EventHandle, either holding
    the other, or the event itself), or None."""
    while event is not None and hasattr(event, "event"):
        event = event.event
    return event


def wait(event: Any, device: str) -> None:
    """The current stream of `device` waits for `event` (an EventOverlap, an EventHandle, a CUDA
    event or None)."""
    given, event = event, _cuda_event(event)
    if event is None:
        return
    import torch

    kinds = (torch.cuda.Event,) + ((torch.Event,) if hasattr(torch, "Event") else ())
    if not isinstance(event, kinds):
        raise InvalidArgumentError(
            f"previous_event: a {type(given).__name__} ({given!r}); must be an EventOverlap, an EventHandle, a CUDA event or None")
    if device != "cpu":
        torch.cuda.current_stream(torch.device(device)).wait_event(event)
