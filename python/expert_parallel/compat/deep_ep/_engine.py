"""The work of one collective call for all the ranks a call of the groups drives: each function
takes one payload per local rank (what that rank's Buffer method was given, checked) and
returns one result per local rank."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

from ... import _arrays
from ...errors import InvalidArgumentError, InvalidUsageError, OutOfMemoryError
from . import _events
from ._errors import not_supported
from ._groups import Entry, Groups, Spec
from ._handle import DispatchHandle, Record
from ._layout import align, exponents_to_float, torch_module


class Payload:
    """One rank's call: its rank number, the event its inputs are ready at, and its arguments as
    attributes (``payload.x``)."""

    def __init__(self, rank: int, ready: Any = None, args: Optional[dict] = None) -> None:
        if args:
            self.__dict__.update(args)
        self.rank, self.ready = rank, ready


def untracked(work: Callable[[Groups, List[Payload]], List[Any]], groups: Groups, payloads: List[Payload]) -> List[Any]:
    """`work(groups, payloads)` with autograd off, on whichever thread runs it: DeepEP's calls read
    their tensors' memory and return tensors without a graph, and the copies into the groups'
    buffers (combine's staging of x) must record none (under grad mode, an x that required grad
    made that in-place copy torch's RuntimeError)."""
    with torch_module().no_grad():
        return work(groups, payloads)


def run(groups: Groups, work: Callable[[Groups, List[Payload]], List[Any]], payloads: List[Payload]) -> List[Tuple[Any, Any]]:
    """Runs `work` once the ranks' inputs are ready; returns each rank's (result, event after it)."""
    for p in payloads:
        _events.wait(p.ready, groups.device)
    results = untracked(work, groups, payloads)
    done = _events.record(groups.device)
    return [(result, done) for result in results]


def _agree(payloads: List[Payload], name: str, value: Callable[[Payload], Any]) -> Any:
    """`value` of rank 0's payload, after checking every rank gives the same."""
    return _agree_all(payloads, (name,), lambda p: (value(p),))[0]


def _agree_all(payloads: List[Payload], names: Tuple[str, ...], values: Callable[[Payload], Tuple[Any, ...]]) -> Tuple[Any, ...]:
    """`values` (one per name) of rank 0's payload, after checking every rank gives the same."""
    first = values(payloads[0])
    for p in payloads[1:]:
        got = values(p)
        if got != first:
            i = next(i for i, (a, b) in enumerate(zip(got, first)) if a != b)
            raise InvalidArgumentError(
                f"{names[i]}: {got[i]!r} on rank {p.rank} but {first[i]!r} on rank {payloads[0].rank}; every rank passes the same")
    return first


def _record_of(payloads: List[Payload], kind: str, name: str = "handle") -> Record:
    record = payloads[0].handle.record
    for p in payloads:
        if not isinstance(p.handle, DispatchHandle):
            raise InvalidArgumentError(f"{name}: a {type(p.handle).__name__} on rank {p.rank}; must be the handle a dispatch returned")
        if p.handle.record is not record:
            raise InvalidArgumentError(f"{name}: rank {p.rank}'s handle is from another dispatch than rank {payloads[0].rank}'s")
        if p.handle.record.kind != kind:
            what = "low_latency_dispatch" if kind == "ll" else "dispatch"
            raise InvalidArgumentError(f"{name}: rank {p.rank}'s handle is not from {what}")
    return record


def _rows(source: Any, count: int, rows: int, fill: int = 0) -> Any:
    """A new tensor of `rows` rows: `source`'s first `count`, then `fill`."""
    torch = torch_module()
    if rows == count:
        return source[:count].clone()
    shape = (rows,) + tuple(source.shape[1:])
    try:
        target = source.new_empty(shape)
    except RuntimeError as error:   # (rows > count: num_worst_tokens's padding, which the caller chose)
        if not _arrays._is_out_of_memory(error):
            raise
        raise OutOfMemoryError(
            f"num_worst_tokens={rows}: a {list(shape)} {source.dtype} tensor of received rows needs "
            f"{_arrays.describe_bytes(math.prod(shape) * source.element_size())}, which could not be allocated "
            f"({str(error).splitlines()[0]}); lower num_worst_tokens") from error
    raw = target.view(torch.uint8) if target.dtype == torch.float8_e4m3fn else target
    raw[count:].fill_(fill)
    target[:count].copy_(source[:count])
    return target


def _spec(algorithm: str, p: Payload, x: Any, top_k: int, experts: int, fp8: Optional[str], source: str,
          multiprocessors: Optional[int]) -> Spec:
    return Spec(algorithm, experts, int(x.shape[1]), top_k, p.dtype, fp8, source, multiprocessors)


# -- high throughput (intranode) ------------------------------------------------------------


def ht_dispatch(groups: Groups, payloads: List[Payload]) -> List[Any]:
    torch = torch_module()
    cached = _agree(payloads, "handle", lambda p: p.handle is not None)
    fp8 = _agree(payloads, "x", lambda p: "an (fp8, scales) tuple" if p.scales is not None else "a tensor") != "a tensor"
    dtype = _agree(payloads, "x dtype", lambda p: p.dtype)
    hidden = _agree(payloads, "x hidden size", lambda p: int(p.x.shape[1]))
    source = "pass_through" if fp8 else "quantize"
    fp8_mode = None
    if fp8:   # float32 scales, or UE8M0 words (int32)
        fp8_mode = _agree(payloads, "x[1] dtype", lambda p: "ue8m0" if p.scales.dtype == torch.int32 else "float32")
    xs = [p.x for p in payloads]
    scales = [p.scales for p in payloads] if fp8 else None
    if cached:
        record = _record_of(payloads, "ht")
        for i, p in enumerate(payloads):
            if int(p.x.shape[0]) != record.tokens[i]:
                raise InvalidArgumentError(
                    f"x: {int(p.x.shape[0])} tokens on rank {p.rank}; the handle's dispatch had {record.tokens[i]}")
        last = record.last.spec
        spec = last._replace(hidden=hidden, dtype=dtype, fp8=fp8_mode, fp8_source=source)
        entry = record.last if spec == last else groups.entry(spec, max(record.tokens))
        step = record.step_in(entry)
        routing = None
        if step is None:   # this routing's first dispatch in this group: its update comes with it
            step = entry.acquire()
            record.steps[entry] = step
            routing = record.topk_idx
        weights = record.topk_weights
    else:
        top_k = _agree(payloads, "topk_idx top-k", lambda p: int(p.topk_idx.shape[1]))
        experts = _agree(payloads, "num_tokens_per_expert size", lambda p: p.experts)
        multiprocessors = _agree(payloads, "config.num_sms", lambda p: p.multiprocessors)
        spec = Spec("ht", experts, hidden, top_k, dtype, fp8_mode, source, multiprocessors)
        tokens = [int(p.x.shape[0]) for p in payloads]
        entry = groups.entry(spec, max(tokens))
        # Copies: DeepEP's handle routes its cached dispatches and its combine as this dispatch
        # routed, whatever the caller writes into its topk_idx / topk_weights afterwards (the
        # steps read the routing again; a cached dispatch into another format starts from it).
        routing = [p.topk_idx.clone() for p in payloads]
        weights = [p.topk_weights.clone() if p.topk_weights is not None
                   else torch.zeros((b, top_k), dtype=torch.float32, device=p.x.device) for p, b in zip(payloads, tokens)]
        step = entry.acquire()
        record = Record("ht", entry, step, tokens, routing, weights)
    entry.settle()
    out = entry.dispatch(xs, routing, weights, step, scales, send_only=False)
    record.last, record.stages[entry] = entry, out.stage
    layouts = out.layouts()
    received = [info.received_total for info in layouts]
    if cached and record.received is not None and received != record.received:
        raise InvalidUsageError(f"handle: its dispatch received {record.received} rows, this one {received}")
    record.received = received
    if not cached:   # DeepEP sizes the handle to num_worst_tokens: its cached dispatches and combine take that many rows
        record.rows = [p.num_worst_tokens or n for p, n in zip(payloads, received)]
    results = []
    for i, p in enumerate(payloads):
        n, worst = received[i], p.num_worst_tokens
        if worst and n > worst:
            raise InvalidArgumentError(f"num_worst_tokens={worst}; rank {p.rank} received {n} tokens, more than that")
        rows = record.rows[i] if cached else worst or n
        recv_x = _rows(out.tokens[i], n, rows)
        if fp8:
            recv_x = (recv_x, _rows(out.scales[i], n, rows))
        handle = p.handle if cached else DispatchHandle(record, p.rank, i)
        if cached:
            results.append((recv_x, None, None, None, handle))
            continue
        recv_idx = _rows(out.topk_idx[i], n, rows, -1).to(p.topk_idx.dtype)
        recv_w = None if p.topk_weights is None else _rows(out.topk_weights[i], n, rows)
        counts = [] if worst else align(layouts[i].expert_counters, p.expert_alignment)
        results.append((recv_x, recv_idx, recv_w, counts, handle))
    return results


def ht_combine(groups: Groups, payloads: List[Payload]) -> List[Any]:
    torch = torch_module()
    record = _record_of(payloads, "ht")
    entry: Entry = record.combining(payloads[0].dtype, int(payloads[0].x.shape[1]))
    step = record.step_in(entry)
    weighted = _agree(payloads, "topk_weights", lambda p: "given" if p.topk_weights is not None else None) is not None
    spec = entry.spec
    for i, p in enumerate(payloads):
        rows = record.rows[i]   # (the received rows, or num_worst_tokens: rows past the received ones are padding)
        if p.dtype != spec.dtype:
            raise InvalidArgumentError(f"x: dtype {p.x.dtype} on rank {p.rank}; the handle's dispatch combines {spec.dtype}")
        if tuple(p.x.shape) != (rows, spec.hidden):
            raise InvalidArgumentError(f"x: shape {list(p.x.shape)} on rank {p.rank}; must be [{rows}, {spec.hidden}], the rows its dispatch returned")
        if weighted and tuple(p.topk_weights.shape) != (rows, spec.top_k):
            raise InvalidArgumentError(
                f"topk_weights: shape {list(p.topk_weights.shape)} on rank {p.rank}; must be [{rows}, {spec.top_k}]")
    grads = entry.grad_stage(len(payloads)) if weighted else None
    for i, p in enumerate(payloads):
        n = record.received[i]
        record.stages[entry][i][:n].copy_(p.x[:n])
        if weighted:
            grads[i][:n].copy_(p.topk_weights[:n])
    device = payloads[0].x.device
    outs = [torch.empty((b, spec.hidden), dtype=payloads[0].x.dtype, device=device) for b in record.tokens]
    grad_outs = [torch.empty((b, spec.top_k), dtype=torch.float32, device=device) for b in record.tokens] if weighted else None
    entry.settle()
    entry.combine(record.stages[entry], step, outs, grads=None if grads is None else list(grads), grad_outs=grad_outs)
    results = []
    for i, p in enumerate(payloads):
        combined = outs[i]
        biases = [b for b in p.bias if b is not None]
        if biases:
            total = combined.float()
            for b in biases:
                total = total + b.float()
            combined = total.to(combined.dtype)
        results.append((combined, None if grad_outs is None else grad_outs[i]))
    return results


# -- low latency -----------------------------------------------------------------------------


def ll_fp8_mode(use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> Optional[str]:
    """The group's fp8 setting for DeepEP's three flags."""
    if use_ue8m0 and not round_scale:
        raise InvalidArgumentError("use_ue8m0=True with round_scale=False; UE8M0 scales are powers of two: set round_scale=True")
    if not use_fp8:
        return None
    return "ue8m0" if round_scale else "float32"


_LL_DISPATCH_AGREES = ("num_max_dispatch_tokens_per_rank", "num_experts", "topk_idx top-k", "x hidden size", "x dtype",
                       "(use_fp8, round_scale, use_ue8m0)", "return_recv_hook")


def ll_dispatch(groups: Groups, payloads: List[Payload]) -> List[Any]:
    bmax, experts, top_k, hidden, dtype, flags, hook = _agree_all(
        payloads, _LL_DISPATCH_AGREES,
        lambda p: (p.max_tokens, p.experts, int(p.topk_idx.shape[1]), int(p.x.shape[1]), p.dtype, p.fp8_flags, p.return_recv_hook))
    fp8 = ll_fp8_mode(*flags)
    if fp8 is not None and hidden % 128:   # (named as the caller wrote it, not as the group's config)
        raise InvalidArgumentError(f"x: hidden size {hidden} with use_fp8=True (DeepEP's default); must be a multiple of 128, "
                                   "the block each FP8 scale covers (pass use_fp8=False for bf16 rows)")
    spec = Spec("ll", experts, hidden, top_k, dtype, fp8, "quantize", None)
    entry = groups.entry(spec, bmax, exact=bmax)
    tokens = [int(p.x.shape[0]) for p in payloads]
    step = entry.acquire()
    # (No weights: LL expert-major's combine takes them, low_latency_combine's.)
    record = Record("ll", entry, step, tokens, [p.topk_idx for p in payloads], None)
    record.idx_versions = [_version(p.topk_idx) for p in payloads]   # (an in-place change since shows in combine)
    entry.settle()
    out = entry.dispatch([p.x for p in payloads], record.topk_idx, None, step, None, send_only=hook)
    record.stage = out.stage
    after: List[Callable[[], None]] = []
    # Pending from here (whatever fails below, the next call completes it); `after` fills in below.
    token = entry.begin_split(after) if hook else None
    results = []
    for i, p in enumerate(payloads):
        recv_x: Any = out.tokens[i]
        if fp8 is not None:
            # DeepEP's column-major scales, made now and filled once the rows are in: with a hook,
            # at its call (the peers' scales arrive with their rows, after a send-only dispatch).
            scales = _ll_scales(out.scales[i], fp8, flags[2], hidden)
            after.append(scales[1])
            recv_x = (recv_x, scales[0])
        stats = p.stats
        if stats is not None:
            after.append(lambda stats=stats, counts=out.counts[i]: _in_place(stats, lambda: stats.add_(counts)))
        results.append([recv_x, out.counts[i], DispatchHandle(record, p.rank, i)])
    if not hook:
        for work in after:
            work()
    return [result + [(entry, token, record)] for result in results]


def _in_place(tensor: Any, work: Callable[[], Any]) -> None:
    """`work` (an in-place update of `tensor`) in the inference mode `tensor` was made in: what a
    send-only call leaves for its receiving half runs whenever that comes (the hook, or the next
    call on the group), in whatever mode the caller is then; torch refuses an in-place update of an
    inference tensor outside inference mode (DeepEP's kernels write by address in any mode)."""
    torch = torch_module()
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        with torch.inference_mode():
            work()
    else:
        work()


def _ll_scales(words: Any, fp8: str, ue8m0: bool, hidden: int) -> Tuple[Any, Callable[[], None]]:
    """DeepEP's low-latency scales of the received rows whose scale words are `words` (the slot's
    buffer ``[L, R*Bmax, words]``): an empty tensor of their shape, its last two dimensions
    column-major, and the work that fills it from `words` (float32 scales as they are, UE8M0
    packed four to an int32 as DeepEP's ``use_ue8m0`` gives them, else as float32 powers of two)."""
    torch = torch_module()
    rows = tuple(words.shape[:-1])
    if fp8 == "float32":
        columns, dtype, read = words.shape[-1], torch.float32, lambda: words
    elif ue8m0:
        columns, dtype = -(-hidden // 512), words.dtype   # every word: ⌈blocks / 4⌉ (640 = 5 blocks: 2 words)
        read = lambda: words[..., :columns]  # noqa: E731
    else:
        columns, dtype, read = hidden // 128, torch.float32, lambda: exponents_to_float(words, hidden // 128)
    target = torch.empty(rows[:-1] + (columns, rows[-1]), dtype=dtype, device=words.device).transpose(-1, -2)

    def fill() -> None:
        _in_place(target, lambda: target.copy_(read()))

    return target, fill


def _version(tensor: Any) -> Optional[int]:
    """`tensor`'s version counter (it counts in-place changes), or None for a tensor made under
    torch.inference_mode, which keeps none (and may be changed in place all the same)."""
    return None if tensor.is_inference() else tensor._version


def ll_combine(groups: Groups, payloads: List[Payload]) -> List[Any]:
    torch = torch_module()
    record = _record_of(payloads, "ll")
    entry: Entry = record.last
    spec = entry.spec
    hook = _agree(payloads, "return_recv_hook", lambda p: p.return_recv_hook)
    recv_shape = tuple(entry.group.recv_shape)
    outs = []
    for i, p in enumerate(payloads):
        b = record.tokens[i]
        if p.dtype != spec.dtype:
            raise InvalidArgumentError(f"x: dtype {p.x.dtype} on rank {p.rank}; the handle's dispatch combines {spec.dtype}")
        if tuple(p.x.shape) != recv_shape:
            raise InvalidArgumentError(f"x: shape {list(p.x.shape)} on rank {p.rank}; must be {list(recv_shape)}, low_latency_dispatch's recv_x")
        for name in ("topk_idx", "topk_weights"):
            got = tuple(getattr(p, name).shape)
            if got != (b, spec.top_k):
                raise InvalidArgumentError(f"{name}: shape {list(got)} on rank {p.rank}; must be [{b}, {spec.top_k}], the dispatch's")
        out = p.out if p.out is not None else torch.empty((b, spec.hidden), dtype=p.x.dtype, device=p.x.device)
        outs.append(out)
    # The weights combine applies (read when it reduces: at the hook's call for a split one). It
    # skips the selections its dispatch sent nowhere (-1), so the caller's own contiguous float32
    # weights do when the routing is the dispatch's tensor, unchanged since; otherwise entries set
    # to -1 here select nothing (DeepEP's kernel reads the routing given to combine).
    weights = []
    for i, p in enumerate(payloads):
        w, idx = p.topk_weights, p.topk_idx
        if (idx is not record.topk_idx[i] or record.idx_versions[i] is None or _version(idx) != record.idx_versions[i]
                or w.dtype != torch.float32
                or not w.is_contiguous()):
            w = torch.where(idx >= 0, w.float(), 0.0)
        weights.append(w)
    entry.settle()
    record.topk_weights = weights   # (alive as long as the handle, which the hook holds)
    after = entry.combine([p.x for p in payloads], record.step_in(entry), outs, weights=weights, send_only=hook)
    token = entry.begin_split(after) if hook else None
    return [(outs[i], (entry, token, record)) for i in range(len(payloads))]
