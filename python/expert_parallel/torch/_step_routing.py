"""The combine op's routing, compared with the one its step's dispatch op was given.

combine reads the routing it is passed (``dispatched.routing``): its B sizes the output, and LL
expert-major's backward pass scatters the weights' gradients by its entries. A Dispatched is a
NamedTuple, so ``_replace(routing=...)`` makes one with another step's routing, and a routing
changed in place after the dispatch is another routing too: the step's rows went by the old one.
The combine op compares, on its data path, the object and its version counter with what its
dispatch op recorded on the handle (one identity test, one version read); anything else comes
here, off the data path, and is refused unless it is the same routing:

- the same memory viewed alike (an alias that a compiled graph regenerated) is, unless its
  version counter moved (changed in place since the dispatch);
- another CPU tensor is if its entries are the step's (compared: host memory, no waiting);
- another GPU tensor of the step's shape is taken unseen, as before this check: comparing its
  entries would wait for the device, and refusing it would refuse a legitimate copy (a clone, a
  tensor a saved-tensor hook restored).

What no counter sees is not caught: a write through NumPy, DLPack or a raw pointer, or into an
inference tensor (which tracks no version), nor another GPU tensor's entries."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import _arrays
from ..errors import InvalidArgumentError

_NAME = "dispatched.routing (the combine op's topk_idx)"
_ADVICE = "pass the routing of that step's dispatch (a Dispatched as its dispatch returned it)"


def version(value: Tensor) -> Optional[int]:
    """`value`'s version counter, or None for an inference tensor (which tracks none)."""
    try:
        return value._version
    except RuntimeError:   # an inference tensor tracks no version
        return None


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def check(handle: Any, tokens: int, topk_idx: Tensor, check_tokens: Callable[[Any, int, Tensor], None]) -> None:
    """Raises the error naming `topk_idx` unless it is the routing the dispatch op of `handle`'s
    step was given, as it was then (see the module); `check_tokens`: the op's test of its B
    against the step's, whose error comes first."""
    check_tokens(handle, tokens, topk_idx)
    source, recorded = handle.torch_routing
    if _same_view(topk_idx, source):
        now = version(topk_idx)
        if recorded is not None and now is not None and now != recorded:
            raise InvalidArgumentError(
                f"{_NAME}: changed in place since the step's dispatch (its version counter went from {recorded} to {now}); the "
                "step's rows went by the routing as it was: leave it unchanged until the step's combine and backward pass are "
                "done, or dispatch again")
        return
    on_cpu = topk_idx.is_cpu and source.is_cpu
    if on_cpu and topk_idx.shape == source.shape:
        # Their entries are compared by reading them: not past the end of a storage shrunk since the
        # tensor was made (untyped_storage().resize_()), which torch does not check.
        error = _arrays.storage_error(topk_idx, _NAME)
        if error is not None:
            raise error
        if _arrays.storage_error(source, _NAME) is not None:
            why = "; that one's storage was shrunk since (untyped_storage().resize_()), so what the step went by is not known here"
        elif recorded is None or version(source) == recorded:
            if torch.equal(topk_idx, source):
                return   # a copy of the step's routing
            where = tuple(int(i) for i in (topk_idx != source).nonzero()[0])
            raise InvalidArgumentError(
                f"{_NAME}: another tensor than the topk_idx the step of dispatched.step was dispatched with, and another "
                f"routing (at [{', '.join(map(str, where))}]: expert {int(topk_idx[where])}, not {int(source[where])}); {_ADVICE}")
        else:
            why = "; that one was changed in place since, so what the step went by is not known here"
    elif on_cpu:
        why = f" (of shape {list(topk_idx.shape)}, the step's {list(source.shape)})"
    elif topk_idx.shape == source.shape and topk_idx.device == source.device:
        return   # on a GPU its entries are not compared (that would wait for the device): see the module
    else:
        why = f" (of shape {list(topk_idx.shape)} on {topk_idx.device}, the step's {list(source.shape)} on {source.device})"
    raise InvalidArgumentError(
        f"{_NAME}: another tensor (at {topk_idx.data_ptr():#x} on {topk_idx.device}) than the topk_idx the step of "
        f"dispatched.step was dispatched with (at {source.data_ptr():#x} on {source.device}){why}: {_ADVICE}")
