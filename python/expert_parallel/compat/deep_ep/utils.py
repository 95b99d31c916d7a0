"""DeepEP's ``deep_ep.utils``: ``EventOverlap`` and ``EventHandle`` (code such as Megatron's
``from deep_ep.utils import EventHandle, EventOverlap``)."""

from __future__ import annotations

from typing import Any

from ._events import EventOverlap, record
from ._layout import torch_module


class EventHandle:
    """DeepEP's ``EventHandle``: a CUDA event recorded on the current stream when it is made (no
    event without CUDA: the CPU backend's calls finish before they return)."""

    def __init__(self) -> None:
        torch = torch_module()
        #: the torch.cuda.Event, or None
        self.event: Any = record("cuda") if torch.cuda.is_available() else None

    def current_stream_wait(self) -> None:
        """The current CUDA stream waits for the event (nothing to wait for without one)."""
        if self.event is not None:
            torch_module().cuda.current_stream().wait_event(self.event)


__all__ = ["EventHandle", "EventOverlap"]
