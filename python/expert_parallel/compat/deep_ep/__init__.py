"""DeepEP's ``deep_ep.Buffer`` over expert_parallel: switch by changing one import::

    from expert_parallel.compat.deep_ep import Buffer, EventOverlap   # was: from deep_ep import ...

Intranode (``get_dispatch_layout``, ``dispatch``, ``combine``) and low-latency
(``low_latency_dispatch``, ``low_latency_combine``) paths with DeepEP's signatures and return
tuples. ``Buffer(group, ...)`` is one rank of a torch.distributed group; ``Buffer.virtual(ranks=R)``
gives R ranks in one process, one thread each (:func:`run_ranks`). What differs and the argument
mapping: docs/switching-from-deepep.md.
"""

import importlib.util as _importlib_util
import sys as _sys
from types import ModuleType as _ModuleType

from ...errors import InvalidUsageError as _InvalidUsageError
from . import _buffer as _buffer_module
from ._buffer import Buffer

buffer = _buffer_module   # deep_ep.buffer, as `import deep_ep.buffer` then `deep_ep.buffer.Buffer` reads it
from ._config import Config
from ._errors import NotSupportedError
from ._events import EventOverlap
from ._handle import DispatchHandle
from ._virtual import run_ranks
from . import utils

try:
    import torch as _torch

    #: DeepEP's routing index type
    topk_idx_t = _torch.int64
except ImportError:  # the adapter needs torch; importing the package does not
    topk_idx_t = None



def install_as_deep_ep(*, replace: bool = False) -> _ModuleType:
    """Makes ``import deep_ep`` (and ``importlib.util.find_spec("deep_ep")``, ``deep_ep.utils``, ``deep_ep.buffer``)
    give this adapter, for frameworks that import DeepEP themselves (vLLM, SGLang, Megatron-style code): call it
    before they do. Returns the module. DeepEP itself, installed or already imported, is kept
    unless ``replace=True`` (which replaces it in ``sys.modules`` only; nothing on disk changes):
    an :class:`expert_parallel.InvalidUsageError` names where it is."""
    module = _sys.modules[__name__]
    current = _sys.modules.get("deep_ep")
    if current is module:
        return module
    if not replace:
        if current is not None:
            raise _InvalidUsageError(f"deep_ep: already imported ({getattr(current, '__file__', current)!r}); "
                                     "call install_as_deep_ep() before it is, or pass replace=True")
        try:
            found = _importlib_util.find_spec("deep_ep")
        except (ImportError, ValueError):
            found = None
        if found is not None:
            raise _InvalidUsageError(f"deep_ep: DeepEP is installed ({found.origin!r}); pass replace=True to use "
                                     "expert_parallel's adapter in its place")
    _sys.modules["deep_ep"] = module
    _sys.modules["deep_ep.utils"] = utils   # (from deep_ep.utils import EventHandle, EventOverlap)
    _sys.modules["deep_ep.buffer"] = _buffer_module   # (from deep_ep.buffer import Buffer)
    return module


__all__ = ["Buffer", "Config", "EventOverlap", "NotSupportedError", "DispatchHandle", "run_ranks", "topk_idx_t",
           "install_as_deep_ep", "utils"]
