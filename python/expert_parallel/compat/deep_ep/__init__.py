"""DeepEP's ``deep_ep.Buffer`` over expert_parallel: switch by changing one import::

    from expert_parallel.compat.deep_ep import Buffer, EventOverlap   # was: from deep_ep import ...

Intranode (``get_dispatch_layout``, ``dispatch``, ``combine``) and low-latency
(``low_latency_dispatch``, ``low_latency_combine``) paths with DeepEP's signatures and return
tuples. ``Buffer(group, ...)`` is one rank of a torch.distributed group; ``Buffer.virtual(ranks=R)``
gives R ranks in one process, one thread each (:func:`run_ranks`). What differs and the argument
mapping: docs/switching-from-deepep.md.
"""

from ._buffer import Buffer
from ._config import Config
from ._errors import NotSupportedError
from ._events import EventOverlap
from ._handle import DispatchHandle
from ._virtual import run_ranks

try:
    import torch as _torch

    #: DeepEP's routing index type
    topk_idx_t = _torch.int64
except ImportError:  # the adapter needs torch; importing the package does not
    topk_idx_t = None

__all__ = ["Buffer", "Config", "EventOverlap", "NotSupportedError", "DispatchHandle", "run_ranks", "topk_idx_t"]
