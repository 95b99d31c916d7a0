"""When an Exchange call may run the ops' implementations directly, without the dispatcher.

A call through ``torch.ops.expert_parallel.*`` pays the dispatcher and torch.library's wrappers
around the Python implementation (autograd key, redispatch, the custom op's backend wrapper):
tens of µs per call, more than the library's own call (docs/torch.md, "Host cost"). In plain
eager use the dispatcher adds nothing: the implementation is the same function, and autograd is
recorded by an ``autograd.Function`` of the same setup and backward functions (_autograd). The
ops stay what everything that intercepts calls sees: `direct` is False, and the call goes through
the op, whenever something could want to see or transform it:

- ``torch.compile`` tracing (asked first: Dynamo folds it and reads nothing further), a
  TorchScript trace;
- a ``__torch_function__`` mode or a ``__torch_dispatch__`` mode (``make_fx``, FakeTensorMode,
  FlopCounterMode, selective activation checkpointing, ...);
- functorch transforms (vmap, grad), and C++ functionalization (``torch._enable_functionalization``,
  whose FunctionalTensorWrappers are plain ``torch.Tensor`` objects to Python, without storage:
  its fallback unwraps them for the op);
- the autograd profiler (the op's name then shows in the trace);
- any argument that is not a plain ``torch.Tensor`` (a subclass: FakeTensor, FunctionalTensor,
  DTensor, ...) or that is on ``meta`` (the op's fake implementation answers those, with its own
  errors).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_C = torch._C
_compiling = torch.compiler.is_compiling
_function_mode = _C._is_torch_function_mode_enabled
_dispatch_modes = _C._len_torch_dispatch_stack
_transforms = _C._are_functorch_transforms_active
_tracing = _C._get_tracing_state
_included = _C._dispatch_tls_is_dispatch_key_included
_FUNCTIONALIZE = _C.DispatchKey.Functionalize
_profiling = torch.autograd._profiler_enabled


def direct(a: Tensor, b: Optional[Tensor] = None, c: Optional[Tensor] = None, d: Optional[Tensor] = None) -> bool:
    """Whether a call of these tensors (None: not given) may run the implementation directly."""
    if (_compiling() or type(a) is not Tensor or a.is_meta or (b is not None and (type(b) is not Tensor or b.is_meta))
            or (c is not None and (type(c) is not Tensor or c.is_meta)) or (d is not None and (type(d) is not Tensor or d.is_meta))):
        return False
    return not (_function_mode() or _dispatch_modes() or _transforms() or _tracing() is not None or _profiling()
                or _included(_FUNCTIONALIZE))
