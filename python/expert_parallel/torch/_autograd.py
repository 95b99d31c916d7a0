"""The ops' backward passes, registered with torch.library.register_autograd.

- dispatch: its adjoint is the step's backward combine (each token's received rows summed,
  unweighted); HT's also carries the received weights' gradients back to the source selections
  (the engine's weight gradients), LL rank-major's are gathered from the selection rows.
- combine: its adjoint is the step's backward dispatch (each token's gradient to its rows); where
  combine applies weights (LL expert-major: the source's topk_weights; HT expert-major: the
  per-slot weights) the rows' gradients are scaled by them, and the weights' gradients are the
  dot products of the token gradients with the expert outputs.

Both keep the step token object itself on ``ctx`` as well as saving it: a saved-tensor hook may
save a copy instead (``save_on_cpu(pin_memory=True)``, one that clones, selective checkpointing
that saves the dispatch op), and a copy does not keep the step live (_registry), so the graph
holds the original until it is freed."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..errors import InvalidUsageError
from . import _eager, _ops, _registry
from ._selections import ll_rows

#: Why an NCCL rank's LL rank-major dispatch cannot differentiate its topk_weights.
RANK_MAJOR_WEIGHTS = ("topk_weights: requires grad, but an NCCLGroup's LL rank-major dispatch cannot give it: the "
                      "weights' gradients are at the ranks that received the rows (LL's backward combine carries none); "
                      "detach topk_weights, or use an HT layout, whose backward combine carries them")


def _group(ctx: Any):
    return _registry.entry(ctx.group).group


def _setup_dispatch(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    x, topk_idx, topk_weights, group = inputs
    ctx.group, ctx.tokens, ctx.weights_shape = group, x.shape[-2], None if topk_weights is None else topk_weights.shape
    # The routing only where the backward reads it (LL rank-major gathers the weights' gradients
    # by it): a tensor saved is held until the backward and may not change in place before it.
    g = _group(ctx)
    reads_idx = g.algorithm == "ll" and g.layout == "rank_major" and topk_weights is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(topk_idx if reads_idx else None, output[3])
    ctx.token = output[3]


def _backward_combine(grad_received: Tensor, grad_weights: Optional[Tensor], step: Tensor, group: int,
                      tokens: int) -> Tuple[Tensor, Tensor]:
    """The backward combine op, or its implementation where the call may skip the dispatcher
    (_eager; not under ``create_graph=True``, where the op's missing derivative is what autograd
    must meet)."""
    if not torch.is_grad_enabled() and _eager.direct(grad_received, grad_weights, step):
        return _ops.run_backward_combine(grad_received, grad_weights, step, group, tokens, False)
    return _ops.backward_combine(grad_received, grad_weights, step, group, tokens)


def _backward_dispatch(grad_combined: Tensor, step: Tensor, group: int) -> Tensor:
    """The backward dispatch op, or its implementation (as `_backward_combine`)."""
    if not torch.is_grad_enabled() and _eager.direct(grad_combined, step):
        return _ops.run_backward_dispatch(grad_combined, step, group)
    return _ops.backward_dispatch(grad_combined, step, group)


def _dispatch_backward(ctx: Any, grad_received: Optional[Tensor], _grad_idx: Any, grad_weights: Optional[Tensor],
                       _grad_step: Any, _grad_counts: Any) -> Tuple[Optional[Tensor], None, Optional[Tensor], None]:
    topk_idx, step = ctx.saved_tensors
    g = _group(ctx)
    wants_weights = ctx.weights_shape is not None and ctx.needs_input_grad[2]
    if g.algorithm == "ht":
        grad_x, grad_w = _backward_combine(grad_received, grad_weights if wants_weights else None, step, ctx.group, ctx.tokens)
        return grad_x, None, grad_w if wants_weights else None, None
    grad_x, _ = _backward_combine(grad_received, None, step, ctx.group, ctx.tokens)
    grad_w = None
    if wants_weights and g.layout == "rank_major" and _registry.entry(ctx.group).one_rank:
        raise InvalidUsageError(RANK_MAJOR_WEIGHTS)
    if wants_weights and g.layout == "rank_major":
        dest, row, valid = ll_rows(topk_idx, g.ranks, g.local_experts, g.max_tokens, g.layout)
        rows = grad_weights.reshape(g.ranks, -1, g.top_k)
        column = torch.arange(g.top_k, device=rows.device).expand_as(row)
        grad_w = torch.where(valid, rows[dest, row, column], torch.zeros((), dtype=rows.dtype, device=rows.device))
    return grad_x, None, grad_w, None


def _scaled(rows: Tensor, weights: Tensor) -> Tensor:
    """``(rows.float() * weights).to(rows.dtype)`` (float32 `weights` broadcast over the rows)
    without its two float32 copies of the rows: the product is computed in float32 and rounded
    as it is stored (the same bits). The rows are the whole receive buffer (LL expert-major:
    ``[R, L, R*Bmax, H]``), whose float32 copies would cost twice its size each. (Where autograd
    records this product, under ``create_graph=True``, it is computed the plain way.)"""
    if torch.is_grad_enabled() and (rows.requires_grad or weights.requires_grad):   # (create_graph=True: out= has no autograd)
        return (rows.float() * weights).to(rows.dtype)
    return torch.mul(rows, weights, out=torch.empty_like(rows))


def _setup_combine(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
    expert_outputs, topk_idx, weights, step, group = inputs
    ctx.group = group
    # Only what the backward reads: the expert outputs (the largest activation) where the weights'
    # gradients need them, the routing where LL expert-major finds each row's weight by it.
    layout = _group(ctx).layout
    weighted = layout in ("expert_major", "expert_major_padded")
    ctx.save_for_backward(expert_outputs if weighted and ctx.needs_input_grad[2] else None,
                          topk_idx if layout == "expert_major" else None, weights if weighted else None, step)
    ctx.token = step


def _combine_backward(ctx: Any, grad_combined: Tensor) -> Tuple[Tensor, None, Optional[Tensor], None, None]:
    expert_outputs, topk_idx, weights, step = ctx.saved_tensors
    g = _group(ctx)
    rows = _backward_dispatch(grad_combined, step, ctx.group)
    if g.layout == "expert_major":
        r, h = g.ranks, g.hidden
        dest, row, valid = ll_rows(topk_idx, r, g.local_experts, g.max_tokens, g.layout)
        zero = torch.zeros((), dtype=torch.float32, device=rows.device)
        # (A scatter_add into the flat slots, not zeros(...).index_put(accumulate=True): torch 2.11's
        # inductor fused that with the gather below and wrote the zeros after the sums.)
        slots = g.recv_shape[0] * g.recv_shape[1]
        slot_weights = torch.zeros((r * slots,), dtype=torch.float32, device=rows.device)
        slot_weights = slot_weights.scatter_add(0, (dest * slots + row).reshape(-1), torch.where(valid, weights, zero).reshape(-1))
        grad_rows = _scaled(rows, slot_weights.reshape(r, g.recv_shape[0], g.recv_shape[1], 1))
        grad_w = None
        if ctx.needs_input_grad[2]:
            chosen = expert_outputs.reshape(r, -1, h)[dest, row].float()            # [R, B, K, H]
            grad_w = torch.where(valid, (chosen * grad_combined.float().unsqueeze(2)).sum(-1), zero)
        return grad_rows, None, grad_w, None, None
    if g.layout == "expert_major_padded":
        grad_rows = _scaled(rows, weights.unsqueeze(-1))
        grad_w = (rows.float() * expert_outputs.float()).sum(-1) if ctx.needs_input_grad[2] else None
        return grad_rows, None, grad_w, None, None
    return rows, None, None, None, None


def _no_derivative(name: str):
    """The backward of backward op `name`: there is none, and differentiating through it (the
    gradient of a gradient a ``create_graph=True`` backward pass gave) raises. An op defined with
    torch.library.Library has no Autograd kernel of its own, and torch's fallback for one lets
    the call through with a zero gradient (a warning at most): the registration gives the error
    that the custom_op-defined ops gave."""
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(f"Trying to backward through expert_parallel.{name}.default (the backward pass of Exchange's "
                           "dispatch and combine), which has no derivative: gradients of gradients through the exchange are "
                           "not supported")
    return backward


def _register() -> None:
    """The ops' Autograd kernels, on a fragment Library of their own: at import, and again by a
    reload of this module or of _ops. The previous fragment goes first: torch (2.11) refuses a
    second Python kernel for the same op and key while the first is registered."""
    global _LIBRARY
    previous = globals().get("_LIBRARY")
    if previous is not None:
        previous._destroy()
    lib = _LIBRARY = torch.library.Library("expert_parallel", "FRAGMENT")
    torch.library.register_autograd("expert_parallel::dispatch", _dispatch_backward, setup_context=_setup_dispatch, lib=lib)
    torch.library.register_autograd("expert_parallel::combine", _combine_backward, setup_context=_setup_combine, lib=lib)
    for name in ("backward_dispatch", "backward_combine"):
        torch.library.register_autograd(f"expert_parallel::{name}", _no_derivative(name), lib=lib)


_register()


# The same derivatives for Exchange's eager calls that skip the dispatcher (_eager): autograd
# records these Functions as the ops' registrations would record theirs (the same setup and
# backward functions, ctx alike). The forward takes ctx itself: a Function with a separate
# setup_context binds its arguments by signature on every call, which costs more than the
# dispatcher saved. EagerDispatch returns None for the routing a layout receives none of (the
# op's ``[R, 0]`` placeholders: Exchange returns None there), whose gradients are then None.

class EagerDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor], group: int) -> Tuple[Tensor, ...]:
        output = _ops.dispatch_entry(_registry.entry(group), x, topk_idx, topk_weights, False)   # (run_dispatch's)
        _setup_dispatch(ctx, (x, topk_idx, topk_weights, group), output)
        return output

    backward = staticmethod(_dispatch_backward)


class EagerCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, expert_outputs: Tensor, topk_idx: Tensor, weights: Optional[Tensor], step: Tensor,
                group: int) -> Tensor:
        entry = _registry.entry(group)   # (run_combine's, but for the step token's test: as `combine`)
        tokens = topk_idx.shape[-2]
        output = _ops.combine_entry(entry, expert_outputs, topk_idx, weights, entry.handle_of(step), tokens)
        _setup_combine(ctx, (expert_outputs, topk_idx, weights, step, group), output)
        return output

    backward = staticmethod(_combine_backward)


# Function.apply is a Python wrapper (~2.5 µs a call) around the C apply, doing what these calls
# need none of: it binds the arguments by signature for a setup_context (these Functions have
# none) and asks for functorch transforms (`_eager.direct` has ruled them out). The C apply is
# called directly, with the tensors as the wrapper passes them on: a dead functorch wrapper (left
# over from a finished transform) unwrapped.
# Both are torch's internals: a torch without them gets Function.apply, which unwraps itself.
try:
    _unwrap = torch._C._functorch.unwrap_if_dead
    _apply_dispatch = super(torch.autograd.Function, EagerDispatch).apply
    _apply_combine = super(torch.autograd.Function, EagerCombine).apply
except AttributeError:  # pragma: no cover (torch 2.11 to 2.13 have both)
    def _unwrap(value):
        return value
    _apply_dispatch, _apply_combine = EagerDispatch.apply, EagerCombine.apply


def _any_wrapped(*values: Optional[Tensor]) -> bool:
    """Whether any of `values` is a functorch wrapper: under no_grad the calls take the tensors as
    given (no Function.apply to unwrap them), and a dead wrapper (left over from a finished
    transform; `_eager.direct` ruled live ones out) has no memory of its own. Asked only once a
    call failed, so the common call pays nothing; the ops read every address before the library
    is called (and before the step starts), so the call is made again, unwrapped, from the start."""
    return any(value is not None and _unwrap(value) is not value for value in values)


FUNC_TRANSFORMS = ("the torch ops do not run under torch.func transforms (grad, vmap, jacrev, ...: torch.library's autograd "
                   "of a Python op has no functorch rule); use torch.autograd (loss.backward() or torch.autograd.grad)")


def _refuse_transforms() -> None:
    """Raises the error naming torch.func where a transform is active (outside torch.compile's
    tracing): torch's own says only that an autograd.Function must override setup_context."""
    if _eager._transforms() and not _eager._compiling():
        raise InvalidUsageError(FUNC_TRANSFORMS)


def dispatch(x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor], group: int) -> Tuple[Tensor, ...]:
    """The dispatch op's outputs for `Exchange.dispatch`: directly where `_eager` allows it."""
    if _eager.direct(x, topk_idx, topk_weights):
        if torch.is_grad_enabled() and (x.requires_grad or (topk_weights is not None and topk_weights.requires_grad)):
            return _apply_dispatch(_unwrap(x), _unwrap(topk_idx), topk_weights if topk_weights is None else _unwrap(topk_weights),
                                   group)
        entry = _registry.entry(group)
        try:
            return _ops.dispatch_entry(entry, x, topk_idx, topk_weights, False)   # (run_dispatch's)
        except RuntimeError:   # (torch's "Cannot access data pointer" of a dead wrapper, read before the step starts)
            if not _any_wrapped(x, topk_idx, topk_weights):
                raise
        return _ops.dispatch_entry(entry, _unwrap(x), _unwrap(topk_idx), topk_weights if topk_weights is None else _unwrap(topk_weights),
                                   False)
    _refuse_transforms()
    return _ops.dispatch(x, topk_idx, topk_weights, group)


def combine(expert_outputs: Tensor, topk_idx: Tensor, weights: Optional[Tensor], step: Tensor, group: int) -> Tensor:
    """The combine op's output for `Exchange.combine`: directly where `_eager` allows it. (Exchange
    has checked `step` to be a 0-dim int64 CPU tensor: `run_combine`'s test of it is not asked again.)"""
    if _eager.direct(expert_outputs, topk_idx, weights, step):
        if torch.is_grad_enabled() and (expert_outputs.requires_grad or (weights is not None and weights.requires_grad)):
            return _apply_combine(_unwrap(expert_outputs), _unwrap(topk_idx), weights if weights is None else _unwrap(weights),
                                  _unwrap(step), group)
        entry = _registry.entry(group)   # (run_combine's, but for the step token's test)
        handle, tokens = entry.handle_of(step), topk_idx.shape[-2]
        try:
            return _ops.combine_entry(entry, expert_outputs, topk_idx, weights, handle, tokens)
        except RuntimeError:   # (as dispatch's: the rows are read before the library is called)
            if not _any_wrapped(expert_outputs, topk_idx, weights):
                raise
        return _ops.combine_entry(entry, _unwrap(expert_outputs), _unwrap(topk_idx), weights if weights is None else _unwrap(weights),
                                  handle, tokens)
    _refuse_transforms()
    return _ops.combine(expert_outputs, topk_idx, weights, step, group)
