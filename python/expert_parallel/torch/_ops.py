"""The custom ops (namespace ``expert_parallel``): dispatch, combine and the two backward calls,
each with a fake implementation that gives the output shapes from the registered group's
configuration, so torch.compile traces them without running them. Their implementations are the
``run_*`` functions, which Exchange's eager calls run directly (_eager).

Every output is a fresh tensor the op allocates and passes to the library as ``out=``: nothing
returned aliases the group's buffer slots, so autograd may keep any output as long as it likes.
Dispatch outputs start as zeros, so rows outside the received zones are zeros (their expert
outputs get zero gradients) rather than another step's rows; an exchange made with
``zero_fill=False`` leaves them unspecified (no fill of the worst-case buffer per call).

An NCCLGroup's tensors are this process's rank's, with no leading rank dimension, and its
dispatch receives into a buffer slot that its peers write: the ops copy the slot's rows out
(see `_dispatch_into`)."""

from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _arrays, _fast
from ..errors import InvalidArgumentError
from . import _registry, _step_routing


# The ops are defined with torch.library.Library, not torch.library.custom_op: the dispatcher then
# calls the implementations with less around them (custom_op's backend wrapper alone cost ~6 µs a
# call on the build machine's CPU), which is what a compiled graph, or a call under a mode, pays.
_RELOADED = "LIBRARY" in globals()   # a reload of this module (importlib.reload, IPython's autoreload): its ops go
if _RELOADED:                          # first, as custom_op's redefinition did (a second "DEF" of the namespace raises)
    LIBRARY._destroy()
LIBRARY = torch.library.Library("expert_parallel", "DEF")


def _op(schema: str, implementation):
    """Defines op ``expert_parallel::<schema's name>`` with `implementation` for CPU and CUDA
    tensors (its fake implementation answers meta and fake tensors: `_fake`); returns its overload.
    As custom_op defined them: integers are SymInts (the backward combine's `tokens` is B, which a
    ``dynamic=True`` graph keeps symbolic; an ``int`` would specialise the graph on it, one
    recompile per B), and the op is tagged pt2_compliant (``only_allow_pt2_compliant_ops``)."""
    name = schema[:schema.index("(")]
    LIBRARY.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    for key in ("CPU", "CUDA"):
        LIBRARY.impl(name, implementation, key)
    return getattr(torch.ops.expert_parallel, name).default


def _fake(name: str):
    return torch.library.register_fake(f"expert_parallel::{name}", lib=LIBRARY)


def _received(entry, like: Tensor, make, placeholders: bool = True) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The received tokens (of `like`'s dtype), topk_idx and topk_weights of a dispatch on
    `like`'s device, made with `make` (torch.zeros where `entry.fills`, else torch.empty;
    torch.empty for a fake; the routing with torch.empty unless `entry.fills_routing`). Where the layout receives no routing (LL expert-major) they are
    ``[R, 0]`` placeholders, which the ops' schema returns, or None without `placeholders`
    (Exchange's eager calls and the backward dispatch, which return none: two tensors fewer,
    ~1 µs each). The ops' leading dimensions, ``(R,)`` for a VirtualGroup and none for an
    NCCLGroup's rank, and the shapes are the registry entry's (found once per group).

    The ops' outputs are made with ``size=`` named: torch's argument parser takes a positional
    shape tuple ~0.6 µs a call slower (it tries another overload first)."""
    device = like.device
    received = make(size=entry.received_shape, dtype=like.dtype, device=device)
    if entry.routing_shape is None and not placeholders:
        return received, None, None
    routing = entry.received_routing_shape
    if not entry.fills_routing:
        make = torch.empty
    return received, make(size=routing, dtype=torch.int32, device=device), make(size=routing, dtype=torch.float32, device=device)


def _outputs(entry, received: Tensor, idx: Optional[Tensor], weights: Optional[Tensor], *counts: Tensor
             ) -> Tuple[Optional[Tensor], ...]:
    """A dispatch's ``out=``: the stacked arrays (one C call), the routing where the layout
    receives it, and `counts` (the rows per local expert) where given."""
    if entry.routing_shape is None:
        return (received, None, None) + counts
    return (received, idx, weights) + counts


def _counts(entry, like: Tensor) -> Tensor:
    """The ``[R, L]`` (NCCL rank: ``[L]``) int32 rows per local expert of a dispatch."""
    return torch.empty(size=entry.counts_shape, dtype=torch.int32, device=like.device)


_INDEX_TYPES = (torch.int32, torch.int64)
_WEIGHT_TYPES = (torch.float32,)
_F32 = torch.float32


def _require(value: Tensor, name: str, dtypes: tuple, shape: tuple, device: int, note: str = "", shown: tuple = ()) -> None:
    """Raises the error naming `name` (as :class:`Exchange` names the argument) unless `value` is
    of one of `dtypes`, on `device` (the group's ordinal, -1: the CPU), shaped `shape`; the message
    shows `shown` (None: B, any size) or `shape`, then `note`. The ops check their inputs so, in
    the real and the fake implementations (torch.compile then reports a wrong one while tracing):
    the group's own checks would name the arrays the ops pass it (``out tokens``, ``xs``).
    Messages are built only for an error."""
    if value.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise InvalidArgumentError(f"{name}: dtype {value.dtype}; must be {wanted}")
    if not (value.is_cpu if device < 0 else value.get_device() == device):   # (get_device: -1 for meta too: is_cpu)
        place = "cpu" if device < 0 else f"cuda:{device}"
        raise InvalidArgumentError(f"{name}: device {value.device}; must be the group's ({place})")
    if value.shape != shape:
        dims = ", ".join("B" if want is None else str(want) for want in shown or shape)
        raise InvalidArgumentError(f"{name}: shape {list(value.shape)}; must be [{dims}]{note}")


def _check_dispatch(entry, x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor]) -> None:
    """The forward dispatch's arguments: x ``[R, B, hidden]`` (NCCL rank: ``[B, hidden]``) of the
    group's dtype, B ≤ max_tokens; topk_idx ``[R, B, top_k]`` int32 or int64; topk_weights
    float32 shaped like topk_idx, or None (LL expert-major: combine checks them)."""
    group, lead, device, sizes = entry.group, entry.lead, entry.device, x.shape
    tokens = sizes[-2] if len(sizes) == len(lead) + 2 else None   # (None: a shape that cannot match)
    _require(x, "x", entry.elements, lead + (tokens, group.hidden), device, shown=lead + (None, group.hidden))
    if tokens > group.max_tokens:
        raise InvalidArgumentError(f"x: {int(tokens)} tokens per rank; must be ≤ max_tokens ({group.max_tokens})")   # (int: a traced size's value)
    rows = lead + (tokens, group.top_k)
    _require(topk_idx, "topk_idx", _INDEX_TYPES, rows, device, ": x's rows, top_k each")
    if topk_weights is not None:
        _require(topk_weights, "topk_weights", _WEIGHT_TYPES, rows, device, ", as topk_idx")


def _check_combine(entry, expert_outputs: Tensor, weights: Optional[Tensor], tokens: int) -> None:
    """The forward combine's arguments: the expert outputs shaped like the dispatch's received
    tokens, of the group's dtype; the weights it applies: LL expert-major's source topk_weights
    ``[R, B, K]``, HT expert-major's per-slot weights (``dispatched.topk_weights``); no other
    layout takes any."""
    group, device = entry.group, entry.device
    _require(expert_outputs, "expert_outputs", entry.elements, entry.received_shape, device, ", as dispatched.tokens")
    if group.layout == "expert_major":
        if weights is None:
            raise InvalidArgumentError("topk_weights: None; the combine of LL expert-major applies the topk_weights")
        _require(weights, "topk_weights", _WEIGHT_TYPES, entry.lead + (tokens, group.top_k), device, ", as topk_idx")
    elif group.layout == "expert_major_padded":
        if weights is None:
            raise InvalidArgumentError("dispatched.topk_weights: None; the combine of HT expert-major applies the per-slot weights")
        _require(weights, "dispatched.topk_weights", _WEIGHT_TYPES, entry.routing_shape, device)
    elif weights is not None:
        raise InvalidArgumentError(f"weights: given; layout {group.layout!r} combines rows that the experts have weighted already")


def _input(value: Tensor, name: str) -> Tensor:
    """`value`, an input whose memory the group reads by address, contiguous and holding its
    values there: a negative view (``is_neg()``) resolved, a copy, as torch's dispatcher resolves
    one given to the op (Exchange's eager calls skip it); a storage that no longer holds the
    tensor's elements (shrunk by ``untyped_storage().resize_()`` since) refused by `name`, before
    anything reads it (a copy would read past it too). ~0.3 µs a tensor (`_fast.sound`)."""
    if value.is_contiguous() and _fast.sound(value, value.data_ptr()):
        return value
    error = _arrays.storage_error(value, name)
    if error is not None:
        raise error
    return value.resolve_neg().contiguous()


def _rows(value: Tensor, name: str) -> Tensor:
    """`value` (rows the group moves: tokens, expert outputs, their gradients) as `_input` makes
    it, starting on an 8-byte boundary, as the stacked calls read rows; a view that starts inside
    an 8-byte word of its storage (``buffer[1:].view(...)``) is copied (the group itself refuses
    it, naming its own argument: ``xs``)."""
    if value.is_contiguous():   # (_input's test, and the boundary)
        address = value.data_ptr()
        if address % 8 == 0 and _fast.sound(value, address):
            return value
    value = _input(value, name)
    return value if value.data_ptr() % 8 == 0 else value.clone()


def _dispatch_into(entry, x: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor], handle, direction: str,
                   outputs: Tuple[Optional[Tensor], ...]) -> None:
    """The group's dispatch of `x` for `handle` into `outputs` (`_outputs`' tuple). A
    VirtualGroup writes them (``out=``). An NCCLGroup receives into its buffer slot, which its
    peers write, and the slot's rows, routing and counts are copied into `outputs` on the stream
    (autograd may keep them past the slot's next dispatch): of the rows only the received zones
    (epGroupCopyReceived: ht-std at one rank of 8 ~310 MB of the 470 MB buffer), into tensors made
    zeroed with `entry.zero_fill`; the routing whole, and with `entry.zero_fill` the slot's
    received routing is cleared after, as the library's dispatch into a caller's tensors does, so
    that its entries outside the next step's zones read 0 / 0 there too, as in a fresh zeroed
    output (the buffers start zeroed; -1 is written only inside the zones). The dispatch ends
    once every peer has written its rows here; a peer writes this slot again only in a later
    dispatch into it, and the dispatch into the other slot comes between (the groups the package
    makes have two), whose end waits for this rank's launch of it, which the stream runs after
    the copies and the clear. This rank's combine reads none of the received buffers (the
    per-slot weights of HT expert-major go back first: `combine`)."""
    g = entry.group
    if not entry.one_rank:
        g._dispatch_fresh(x, topk_idx, topk_weights, handle, direction, outputs)   # (outputs: ours, made for the group)
        return
    result = g.dispatch(x, topk_idx, topk_weights, handle=handle, direction=direction)
    g._copy_received(result.handle, outputs[0])
    slot = g._slots[result.handle.slot]   # (its own tensors: the result's are the caller's to rebind)
    pairs = [] if outputs[1] is None else [(outputs[1], slot.idx_own), (outputs[2], slot.weights_own)]
    for mine, received in pairs:
        mine.copy_(received)
        if entry.zero_fill:
            received.zero_()
    if len(outputs) > 3:
        outputs[3].copy_(slot.counts_own)


def _combine_into(entry, rows: Tensor, handle, out, **options) -> None:
    """The group's combine of `rows` for `handle` into `out` (tensors the op has just made): a
    VirtualGroup's reads only their addresses (`VirtualGroup._combine_fresh`)."""
    if entry.one_rank:
        entry.group.combine(rows, handle, out=out, **options)
    else:
        entry.group._combine_fresh(rows, handle, out, **options)


def run_dispatch(x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor], group: int, placeholders: bool = True
                 ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
    """Starts a step with `topk_idx` and dispatches `x` (``[R, B, H]``): (received tokens,
    received topk_idx, received topk_weights, step token, ``[R, L]`` int32 rows per local
    expert); the routing of a layout that receives none is ``[R, 0]``, or None without
    `placeholders` (`_received`)."""
    return dispatch_entry(_registry.entry(group), x, topk_idx, topk_weights, placeholders)


def dispatch_entry(entry, x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor], placeholders: bool = True
                   ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
    """`run_dispatch` of registered group `entry`. Its checks are `_check_dispatch`, `_rows` and
    `_input`, asked first in line (the common call: every argument as the group takes it), and
    through those functions, which name what is wrong (or copy what needs it), for anything else."""
    sizes, lead, device = x.shape, entry.lead, entry.device
    tokens = sizes[-2] if len(sizes) == entry.x_dims else None   # (None: a shape that cannot match)
    if (x.dtype is entry.element and sizes == lead + (tokens, entry.hidden) and tokens <= entry.max_tokens
            and topk_idx.dtype in _INDEX_TYPES and topk_idx.shape == lead + (tokens, entry.top_k)
            and (topk_weights is None or (topk_weights.dtype is _F32 and topk_weights.shape == lead + (tokens, entry.top_k)))
            and ((x.is_cpu and topk_idx.is_cpu and (topk_weights is None or topk_weights.is_cpu)) if device < 0
                 else (x.get_device() == device and topk_idx.get_device() == device
                       and (topk_weights is None or topk_weights.get_device() == device)))):
        # _rows' and _input's tests in line (contiguity first, as theirs: a sparse tensor fails it)
        rows = x if x.is_contiguous() and x.data_ptr() % 8 == 0 and _fast.sound(x, x.data_ptr()) else _rows(x, "x")
        routing = (topk_idx if topk_idx.is_contiguous() and _fast.sound(topk_idx, topk_idx.data_ptr())
                   else _input(topk_idx, "topk_idx"))   # (a sparse one fails here, before a step is taken)
    else:
        _check_dispatch(entry, x, topk_idx, topk_weights)
        rows, routing = _rows(x, "x"), _input(topk_idx, "topk_idx")
    carried = None if topk_weights is None else _input(topk_weights, "topk_weights")
    # The outputs (`_received`, `_counts`): made like the rows (new_empty(size=): a quarter cheaper
    # than torch.empty's arguments), which are of the dtype and on the device checked above.
    make = rows.new_zeros if entry.fills else rows.new_empty
    received = make(size=entry.received_shape)
    if entry.routing_shape is None and not placeholders:
        idx = weights = None
    else:
        shape = entry.received_routing_shape
        make = make if entry.fills_routing else rows.new_empty
        idx, weights = make(size=shape, dtype=torch.int32), make(size=shape, dtype=torch.float32)
    counts = rows.new_empty(size=entry.counts_shape, dtype=torch.int32)
    handle, token = entry.start()
    try:   # (_step_routing.version in line) what combine compares its routing with
        handle.torch_routing = (topk_idx, topk_idx._version)
    except RuntimeError:   # an inference tensor tracks no version
        handle.torch_routing = (topk_idx, None)
    # The group keeps the weights on the step's handle (combine reads them again): detached
    # aliases, same memory and no graph. The received weights become this op's output, whose
    # autograd node holds the step token, and the registry holds a live step's handle until the
    # token is freed: the tensors themselves would close a cycle, so that a step whose backward
    # pass never runs (an output dropped, non-reentrant checkpointing's first forward, an error
    # mid-step) stayed live for good with the graph behind it (the source weights' too).
    outputs = ((received, None, None, counts) if entry.routing_shape is None
               else (received, idx, weights.detach(), counts))   # (`_outputs`)
    carried = None if carried is None else carried.detach()
    if entry.one_rank:
        _dispatch_into(entry, rows, routing, carried, handle, "forward", outputs)
    else:   # (outputs: ours, made for the group)
        entry.group._dispatch_fresh(rows, routing, carried, handle, "forward", outputs)
    entry.require_active()   # after the call: its update fixes the step's ranks (a rank masked in it, too)
    return received, idx, weights, token, counts


dispatch = _op("dispatch(Tensor x, Tensor topk_idx, Tensor? topk_weights, SymInt group) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
               run_dispatch)


@_fake("dispatch")
def _(x, topk_idx, topk_weights, group):
    entry = _registry.entry(group)
    _check_dispatch(entry, x, topk_idx, topk_weights)
    received, idx, weights = _received(entry, x, torch.empty)
    return received, idx, weights, torch.empty((), dtype=torch.int64), _counts(entry, x)


def _bind_weights(entry, handle, weights: Optional[Tensor]) -> Optional[Tensor]:
    """The forward combine's weights (`_check_combine` checked them): LL expert-major's source
    topk_weights (returned: combine takes them), HT expert-major's per-slot weights (the step's
    received ones, set on `handle`); other layouts take none."""
    layout = entry.group.layout
    if layout == "expert_major":
        return weights
    if layout == "expert_major_padded" and not entry.one_rank:   # (an NCCL rank's combine reads its slot's: run_combine)
        handle.received_weights = weights.detach()   # (no graph: as run_dispatch's)
    return None


def _step_tokens(handle) -> Optional[int]:
    """The tokens per rank (B) that `handle`'s step dispatched, or None where it has none."""
    return handle.tokens if isinstance(handle.tokens, int) else (handle.tokens[0] if handle.tokens else None)


def _check_fake_step(step: Tensor, *others: Tuple[str, Optional[Tensor]]) -> None:
    """Raises the error naming a step token (or another input of `others`, (name, tensor) pairs
    the fake implementation does not check otherwise) on ``meta``: one meta input sends the op to
    its fake implementation outside tracing too, whose outputs (on the other inputs' device) are
    uninitialised memory."""
    if step.device.type == "meta":
        raise InvalidArgumentError("step: a tensor on meta; must be the step token dispatch returned (a 0-dim torch.int64 tensor "
                                   "on the CPU): a meta input runs the op's fake implementation, whose outputs are uninitialised")
    for name, value in others:
        if value is not None and value.device.type == "meta":
            raise InvalidArgumentError(f"{name}: a tensor on meta; must be on the group's device: a meta input runs the op's fake "
                                       "implementation, whose outputs are uninitialised")


def _check_step_tokens(handle, tokens: int, topk_idx: Tensor) -> None:
    """Raises the error naming the routing unless its B is that of the step whose token combine
    got: the routing of another step (a ``Dispatched`` whose fields come from two dispatches)
    would size the output, and the group would refuse it as ``out`` (or LL expert-major's weights
    as not shaped like the routing), not as the routing. Asked once combine has failed."""
    dispatched = _step_tokens(handle)
    if dispatched is not None and tokens != dispatched:
        raise InvalidArgumentError(
            f"dispatched.routing (the combine op's topk_idx): shape {list(topk_idx.shape)}, {tokens} tokens per rank; the step of "
            f"dispatched.step dispatched {dispatched}: pass the routing of that step's dispatch (a Dispatched as its dispatch "
            "returned it)")


def run_combine(expert_outputs: Tensor, topk_idx: Tensor, weights: Optional[Tensor], step: Tensor, group: int) -> Tensor:
    """The step's forward combine of ``[R, *recv_shape]`` expert outputs: ``[R, B, H]``."""
    entry = _registry.entry(group)
    tokens = topk_idx.shape[-2]
    return combine_entry(entry, expert_outputs, topk_idx, weights, entry.step(step), tokens)


def combine_entry(entry, expert_outputs: Tensor, topk_idx: Tensor, weights: Optional[Tensor], handle, tokens: int) -> Tensor:
    """`run_combine` of registered group `entry`, the live `handle` its step token names
    (`_registry.Entry.step`) and the routing's B, `tokens`. Its checks are `_check_combine`,
    `_input` and `_rows`, asked first in line (the common call: every argument as the group takes
    it), and through those functions, which name what is wrong (or copy what needs it), for
    anything else."""
    g = entry.group
    source = handle.torch_routing
    if topk_idx is not source[0] or (source[1] is not None and topk_idx._version != source[1]):
        _step_routing.check(handle, tokens, topk_idx, _check_step_tokens)   # (raises unless it is the step's routing)
    try:
        device, layout = entry.device, g.layout
        # _check_combine's tests, and _input's of the weights, in line for the layouts that take no
        # weights and for LL expert-major's (the source topk_weights, which combine applies as given)
        if (expert_outputs.dtype is entry.element and expert_outputs.shape == entry.received_shape
                and (expert_outputs.is_cpu if device < 0 else expert_outputs.get_device() == device)
                and ((layout != "expert_major" and layout != "expert_major_padded") if weights is None
                     else (layout == "expert_major" and weights.dtype is _F32 and weights.shape == entry.lead + (tokens, entry.top_k)
                           and (weights.is_cpu if device < 0 else weights.get_device() == device)
                           and weights.is_contiguous() and _fast.sound(weights, weights.data_ptr())))):
            applied = weights   # (`_bind_weights`: these layouts bind none to the handle)
        else:
            _check_combine(entry, expert_outputs, weights, tokens)
            if weights is not None:   # (named as _check_combine names them)
                weights = _input(weights, "topk_weights" if layout == "expert_major" else "dispatched.topk_weights")
            applied = _bind_weights(entry, handle, weights)
        slot_weights = None
        if entry.one_rank and layout == "expert_major_padded":
            # An NCCL rank's combine applies the per-slot weights where its peers read them, in the
            # buffer slot, which the dispatch op copied out (and cleared): these go back there first,
            # and are cleared again once the combine is done with them (its end waits for the peers'
            # reads). Not into a slot a later dispatch has used since: the combine refuses that step.
            slot = g._slots[handle.slot]
            if slot.use == handle.slot_use:
                slot_weights = slot.weights_own
                slot_weights.copy_(weights)
        combined = expert_outputs.new_empty(size=entry.lead + (tokens, entry.hidden))
        try:   # (the rows too: an NCCL rank's slot weights are cleared again when they are refused)
            rows = expert_outputs   # (_rows' test in line, as `dispatch_entry`'s)
            if not (rows.is_contiguous() and rows.data_ptr() % 8 == 0 and _fast.sound(rows, rows.data_ptr())):
                rows = _rows(expert_outputs, "expert_outputs")
            if entry.one_rank:
                entry.group.combine(rows, handle, out=combined, topk_weights=applied)   # (`_combine_into`)
            else:
                g._combine_fresh(rows, handle, combined, topk_weights=applied)
        finally:
            if slot_weights is not None and entry.zero_fill:
                slot_weights.zero_()
    except InvalidArgumentError:
        _check_step_tokens(handle, tokens, topk_idx)   # (the routing of another step: named as the cause)
        raise
    return combined


combine = _op("combine(Tensor expert_outputs, Tensor topk_idx, Tensor? weights, Tensor step, SymInt group) -> Tensor", run_combine)


@_fake("combine")
def _(expert_outputs, topk_idx, weights, step, group):
    entry = _registry.entry(group)
    _check_fake_step(step, ("topk_idx", topk_idx))
    tokens = topk_idx.shape[-2]
    if (entry.group.layout == "expert_major" and weights is not None and weights.dim() == topk_idx.dim()
            and weights.shape[-2] != tokens):
        # (Traced, the step's B is unknown: the routing sizes the output and the weights' check,
        # and two steps' fields would be refused as the weights, where eager names the routing.)
        raise InvalidArgumentError(
            f"dispatched.routing (the combine op's topk_idx): shape {list(topk_idx.shape)}, {tokens} tokens per rank; "
            f"topk_weights: shape {list(weights.shape)}, {weights.shape[-2]}: pass the routing and weights of the step's "
            "dispatch (a Dispatched as its dispatch returned it)")
    _check_combine(entry, expert_outputs, weights, tokens)
    return expert_outputs.new_empty(entry.lead + (tokens, entry.group.hidden))


def run_backward_dispatch(grad_combined: Tensor, step: Tensor, group: int) -> Tensor:
    """The step's routing again, backward: each token's gradient ``[R, B, H]`` to every row the
    forward dispatch filled (the adjoint of combine's sum)."""
    entry = _registry.entry(group)
    g, handle = entry.group, entry.step(step)
    # (A direct call's gradient of another shape raised IndexError, or was named xs.)
    _require(grad_combined, "grad_combined", entry.elements, entry.lead + (_step_tokens(handle), g.hidden), entry.device,
             ", the step's tokens")
    received, idx, weights = _received(entry, grad_combined, torch.zeros if entry.fills else torch.empty, False)
    routing = None
    if g.recv_routing_shape is not None:   # these layouts send weights along; the backward pass ignores them
        routing = torch.zeros(size=entry.lead + (grad_combined.shape[-2], g.top_k), dtype=torch.float32, device=grad_combined.device)
    _dispatch_into(entry, _rows(grad_combined, "grad_combined"), None, routing, handle, "backward", _outputs(entry, received, idx, weights))
    return received


backward_dispatch = _op("backward_dispatch(Tensor grad_combined, Tensor step, SymInt group) -> Tensor", run_backward_dispatch)


@_fake("backward_dispatch")
def _(grad_combined, step, group):
    _check_fake_step(step)
    return grad_combined.new_empty(_registry.entry(group).received_shape)


def run_backward_combine(grad_received: Tensor, grad_weights: Optional[Tensor], step: Tensor, group: int,
                         tokens: int, placeholders: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """The step's backward combine: the received rows' gradients summed per source token
    (unweighted, the adjoint of dispatch), ``[R, B, H]``; HT also carries `grad_weights` (shaped
    like the received topk_weights) back to the source selections, ``[R, B, K]`` (for LL the
    op's ``[R, 0]`` placeholder, or None without `placeholders`: as `run_dispatch`)."""
    entry = _registry.entry(group)
    g, handle = entry.group, entry.step(step)
    dispatched = _step_tokens(handle)
    if tokens != dispatched:   # (a direct call's: -1 raised torch's RuntimeError, another B was named out)
        raise InvalidArgumentError(f"tokens={tokens}; must be {dispatched}, the tokens per rank of the step's dispatch")
    _require(grad_received, "grad_received", entry.elements, entry.received_shape, entry.device, ", as dispatched.tokens")
    if grad_weights is not None and g.algorithm == "ht":
        _require(grad_weights, "grad_weights", _WEIGHT_TYPES, entry.routing_shape, entry.device, ", as dispatched.topk_weights")
    lead = entry.lead
    grad_x = grad_received.new_empty(size=lead + (tokens, g.hidden))
    if g.algorithm != "ht":
        _combine_into(entry, _rows(grad_received, "grad_received"), handle, grad_x, direction="backward")
        return grad_x, grad_received.new_empty(size=lead + (0,), dtype=torch.float32) if placeholders else None
    if grad_weights is None:
        grad_weights = torch.zeros(size=entry.routing_shape, dtype=torch.float32, device=grad_received.device)
    grad_w = torch.empty(size=lead + (tokens, g.top_k), dtype=torch.float32, device=grad_received.device)
    _combine_into(entry, _rows(grad_received, "grad_received"), handle, (grad_x, grad_w), direction="backward",
                  weight_gradients=_input(grad_weights, "grad_weights"))
    return grad_x, grad_w


backward_combine = _op("backward_combine(Tensor grad_received, Tensor? grad_weights, Tensor step, SymInt group, SymInt tokens) -> (Tensor, Tensor)",
                       run_backward_combine)


@_fake("backward_combine")
def _(grad_received, grad_weights, step, group, tokens):
    entry = _registry.entry(group)
    g = entry.group
    _check_fake_step(step, ("grad_weights", grad_weights))
    if tokens < 0:
        raise InvalidArgumentError(f"tokens={tokens}; must be the tokens per rank of the step's dispatch (≥ 0)")
    lead = entry.lead
    shape = lead + ((tokens, g.top_k) if g.algorithm == "ht" else (0,))
    return grad_received.new_empty(lead + (tokens, g.hidden)), grad_received.new_empty(shape, dtype=torch.float32)


if _RELOADED and f"{__package__}._autograd" in sys.modules:   # the derivatives, again for the redefined ops
    sys.modules[f"{__package__}._autograd"]._register()
