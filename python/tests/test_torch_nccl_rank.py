"""The torch ops over an NCCLGroup (one rank per process) without a GPU: an NCCLGroup of one rank
over CPU tensors whose library calls are run by a CPU VirtualGroup of one rank, on the tensors at
the addresses the calls pass (the stacked calls' one part); against Exchange over such a
VirtualGroup directly: the same outputs and gradients, bit for bit, in the layouts the ops take
over NCCL ranks, the slot's buffers copied out (and cleared with zero_fill); the layout and the
gradient they cannot give refused by name. On GPUs the same calls run in python/tests/nccl_worker.py
(torchrun)."""

import ctypes
import gc
import itertools

import numpy as np
import pytest

import expert_parallel as ep
from expert_parallel import _abi, _group_base, nccl_group

torch = pytest.importorskip("torch")

from expert_parallel.torch import Exchange  # noqa: E402
from test_nccl_group_calls import cpu_rank_group  # noqa: E402

TORCH = {_abi.BF16: torch.bfloat16, _abi.F32: torch.float32, _abi.I32: torch.int32, _abi.I64: torch.int64}


def view(argument, shape):
    """The tensor an epStacked_t's one part describes, `shape`d, over the same memory; None where not given."""
    if not argument.data:
        return None
    dtype = TORCH[argument.dtype]
    count = int(np.prod(shape))
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    size = count * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_byte * size).from_address(argument.data), dtype=dtype).view(shape)


class OneRank:
    """The library's calls of an NCCL rank with no peers, run by `reference`, a CPU VirtualGroup
    of one rank: its handles one per step the NCCL group made."""

    def __init__(self, group, reference):
        self.group, self.reference, self.handles = group, reference, {}
        self.received_at = {}   # step -> the address of the received rows its last dispatch wrote (its slot's)

    def handle(self, step):
        if step not in self.handles:
            self.handles[step] = self.reference.handle()
        return self.handles[step]

    def dispatch(self, d):
        g, b = self.group, d.tokens
        x, idx, w = view(d.inputTokens, (b, g.hidden)), view(d.topkIdx, (b, g.top_k)), view(d.topkWeights, (b, g.top_k))
        routing = g.recv_routing_shape
        out = (view(d.receivedTokens, g.recv_shape)[None],
               None if routing is None else view(d.receivedTopkIdx, routing)[None],
               None if routing is None else view(d.receivedTopkWeights, routing)[None],
               view(d.expertCounts, (g.local_experts,))[None])
        self.reference.dispatch(x[None], None if idx is None else idx[None], None if w is None else w[None],
                                handle=self.handle(d.step), direction=("forward", "backward")[d.direction], out=out)
        self.received_at[d.step] = d.receivedTokens.data

    def copy_received(self, step, tokens):
        """epGroupCopyReceived: the received zones of `step`'s dispatch (from the reference's layout
        of it: LL expert-major per local expert, rank-major per source rank, HT the rows in use)
        copied from the slot that dispatch wrote into `tokens`; nothing else is written."""
        step = getattr(step, "value", step)   # (the handle's c_void_p, or None: as the dispatch struct's field reads)
        g, handle = self.group, self.handle(step)
        source = view(_abi.Stacked(data=self.received_at[step], dtype=tokens.dtype), g.recv_shape)
        destination = view(tokens, g.recv_shape)
        layout = self.reference._layout_of(handle)[0]
        rows_of = source.reshape(-1, g.hidden), destination.reshape(-1, g.hidden)
        if g.algorithm == "ht":
            zones = [(0, layout.received_total)]
        elif g.layout == "rank_major":
            zones = [(s * g.max_tokens, n) for s, n in enumerate(layout.source_rank_counters)]
        else:
            zones = list(zip(layout.expert_offsets, layout.expert_counters))
        for first, rows in zones:
            rows_of[1][first:first + rows] = rows_of[0][first:first + rows]

    def combine(self, c):
        g, handle = self.group, self.handle(c.step)
        b = handle.tokens[0]
        y, combined = view(c.expertOutputs, g.recv_shape), view(c.combinedTokens, (b, g.hidden))
        settings = {"direction": ("forward", "backward")[c.direction], "out": combined[None]}
        if c.weightGradients.data:   # HT backward
            settings["weight_gradients"] = view(c.weightGradients, g.recv_routing_shape)[None]
            settings["out"] = (combined[None], view(c.topkWeightGradients, (b, g.top_k))[None])
        elif g.layout == "expert_major_padded" and c.direction == 0:
            # The slot's received weights (the reference's handle has them from its dispatch into the slot).
            assert ctypes.addressof(c) and view(c.topkWeights, g.recv_routing_shape).data_ptr() == handle.received_weights[0].data_ptr()
        self.reference.combine(y[None], handle, **settings)


@pytest.fixture
def rank_group(monkeypatch):
    """make(**settings) -> (NCCLGroup of rank 0 of 1 over CPU tensors, its slots), whose library
    calls run a CPU VirtualGroup of one rank."""
    pointers = itertools.count(0x7000, 16)
    # The NCCL group's handles: a pointer of its own each, as the library gives, released to no one.
    monkeypatch.setattr(nccl_group.NCCLGroup, "handle", lambda self: _group_base._HeldHandle(self, ctypes.c_void_p(next(pointers))))
    monkeypatch.setattr(nccl_group.NCCLGroup, "_release_step", lambda self, handle: None)
    monkeypatch.setattr(nccl_group, "call", lambda name, *arguments: None)
    # Its one rank active (the torch ops read the mask once a call of the process has masked a rank).
    monkeypatch.setattr(nccl_group.NCCLGroup, "active_ranks", property(lambda self: [0]))
    made = []

    def make(**settings):
        shape = dict(ranks=1, **settings_of("ht", "flat", "f32"))
        shape.update(settings)
        reference = ep.VirtualGroup(**shape, device="cpu")

        def entry(name):
            if name == "epGroupCopyReceived":
                return lambda _group, step, address, _stream: fake.copy_received(
                    step, ctypes.cast(address, ctypes.POINTER(_abi.Tensor)).contents) or _abi.SUCCESS

            def run(_group, address, _stream):
                struct = {"epGroupDispatchStacked": _abi.StackedDispatch, "epGroupCombineStacked": _abi.StackedCombine}[name]
                arguments = ctypes.cast(address, ctypes.POINTER(struct)).contents
                (fake.dispatch if name == "epGroupDispatchStacked" else fake.combine)(arguments)
                return _abi.SUCCESS
            return run

        group = cpu_rank_group(reference, entry)
        fake = OneRank(group, reference)
        made.append(reference)
        return group

    yield make
    for reference in made:
        reference.close()


def experts(sent, layout):
    """Differentiable stand-ins for the experts, shaped like the received rows: flat and rank-major
    rows are weighted by their received weights (summed), as the experts of those layouts do."""
    rows = sent.tokens.float()
    y = rows * 1.5 + rows.square() * 0.25
    if layout in ("flat", "rank_major"):
        y = y * sent.topk_weights.sum(-1, keepdim=True)
    return y.to(sent.tokens.dtype)


def inputs(tokens, experts_count, hidden, top_k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(experts_count, generator=g)[:top_k] for _ in range(tokens)])
    idx = torch.where(torch.rand(idx.shape, generator=g) < 0.15, -1, idx)
    w = torch.rand(tokens, top_k, generator=g)
    return x, idx, w


CASES = [("ht", "flat", True), ("ht", "expert_major_padded", True), ("ll", "rank_major", False)]


def settings_of(algorithm, layout, dtype):
    settings = dict(experts=8, hidden=32, top_k=3, max_tokens=8, algorithm=algorithm, layout=layout, dtype=dtype)
    if layout == "expert_major_padded":
        settings["alignment"] = 4
    return settings


def compare_with_the_reference(on_rank, on_reference, weights_grad, device="cpu", exact_weights=True):
    """Three layers' forward through `on_rank` (an Exchange over an NCCL rank of one) and
    `on_reference` (over a CPU VirtualGroup of one rank) — the buffer slots in turn, the first
    reused by the third, every step live until one backward pass, so what autograd kept must
    not be the slots' rows — then the backward pass: outputs and x's gradients bit for bit;
    topk_weights' too where `exact_weights` (on a GPU torch's sums over the hidden size run in
    another order: within 1e-5)."""
    group, layout = on_rank.group, on_rank.layout
    element = {"f32": torch.float32, "bf16": torch.bfloat16}[group.dtype]
    leaves, loss_a, loss_b = [], 0, 0
    for step, tokens in enumerate([8, 8, 5]):   # the third reuses the first slot with fewer rows: stale ones would show
        x, idx, w = inputs(tokens, group.experts, group.hidden, group.top_k, element, step)
        xa, wa = x.clone().to(device).requires_grad_(), w.clone().to(device).requires_grad_(weights_grad)
        xb, wb = x[None].clone().requires_grad_(), w[None].clone().requires_grad_(weights_grad)
        sa, sb = on_rank.dispatch(xa, idx.to(device), wa), on_reference.dispatch(xb, idx[None], wb)
        assert sa.tokens.shape == tuple(group.recv_shape) and torch.equal(sa.tokens.cpu(), sb.tokens[0])
        assert torch.equal(sa.expert_counts.cpu(), sb.expert_counts[0])
        if group.recv_routing_shape is not None:
            assert torch.equal(sa.topk_idx.cpu(), sb.topk_idx[0]) and torch.equal(sa.topk_weights.cpu(), sb.topk_weights[0])
        ya, yb = on_rank.combine(experts(sa, layout), sa), on_reference.combine(experts(sb, layout), sb)
        assert ya.shape == (tokens, group.hidden) and torch.equal(ya.cpu(), yb[0])
        loss_a, loss_b = loss_a + ya.float().square().sum() * (step + 1), loss_b + yb.float().square().sum() * (step + 1)
        leaves.append((xa, wa, xb, wb))
    loss_a.backward()
    loss_b.backward()
    for step, (xa, wa, xb, wb) in enumerate(leaves):
        assert torch.equal(xa.grad.cpu(), xb.grad[0]), f"step {step}: x.grad"
        if weights_grad and exact_weights:
            assert torch.equal(wa.grad.cpu(), wb.grad[0]), f"step {step}: topk_weights.grad"
        elif weights_grad:
            assert torch.allclose(wa.grad.cpu(), wb.grad[0], rtol=1e-5, atol=1e-6), f"step {step}: topk_weights.grad"


@pytest.mark.parametrize("algorithm,layout,weights_grad", CASES)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_the_ops_over_an_nccl_rank_give_the_virtual_groups_values_and_gradients(rank_group, algorithm, layout, weights_grad, dtype):
    settings = settings_of(algorithm, layout, dtype)
    group = rank_group(**settings)
    reference = ep.VirtualGroup(ranks=1, device="cpu", **settings)
    on_rank, on_reference = Exchange(group), Exchange(reference)
    assert on_rank.one_rank and not on_reference.one_rank
    compare_with_the_reference(on_rank, on_reference, weights_grad)
    on_rank.close()
    on_reference.close()
    reference.close()


@pytest.mark.parametrize("zero_fill", [True, False])
def test_an_nccl_ranks_rows_are_copied_out_and_its_routing_cleared_with_zero_fill(rank_group, zero_fill):
    # The rows: only the received zones are copied (epGroupCopyReceived), and the slot's rows stay;
    # the routing: copied whole, and cleared in the slot with zero_fill.
    group = rank_group(layout="flat")
    exchange = Exchange(group, zero_fill=zero_fill)
    x, idx, w = inputs(6, 8, 32, 3, torch.float32, 9)
    sent = exchange.dispatch(x, idx, w)
    slot = group._slots[0]
    assert sent.tokens.data_ptr() != slot.tokens.data_ptr() and sent.topk_idx.data_ptr() != slot.idx.data_ptr()
    # (HT's zone starts at row 0; past it, without zero_fill, the rows are whatever torch.empty held)
    assert sent.tokens[0].abs().sum() > 0 and (sent.topk_idx >= 0).any()
    assert slot.tokens.any()
    cleared = [not t.any() for t in (slot.idx, slot.weights)]
    assert cleared == [zero_fill] * 2
    exchange.close()


@pytest.mark.parametrize("algorithm, layout", [("ht", "flat"), ("ht", "expert_major_padded"), ("ll", "rank_major")])
def test_an_nccl_ranks_rows_outside_the_zones_are_zeros_with_zero_fill_whatever_the_slot_holds(rank_group, algorithm, layout):
    # Only the zones are copied out of the slot: rows past them there (an earlier step's; here
    # 7s) never reach the received tokens, which read the same as from a zeroed slot.
    group = rank_group(algorithm=algorithm, layout=layout, alignment=4 if layout == "expert_major_padded" else 1)
    exchange = Exchange(group, zero_fill=True)
    step = inputs(5, 8, 32, 3, torch.float32, 4)
    group._slots[0].tokens.fill_(7.0)
    over_sevens = exchange.dispatch(*step)          # slot 0
    group._slots[1].tokens.zero_()
    over_zeros = exchange.dispatch(*step)           # slot 1
    assert torch.equal(over_sevens.tokens, over_zeros.tokens)
    assert over_zeros.tokens.any() and not over_zeros.tokens.all()   # rows inside the zones and outside them
    assert group._slots[0].tokens.eq(7.0).any()     # the slot's 7s are still there
    exchange.close()


def test_what_an_nccl_rank_cannot_differentiate_is_refused_by_name(rank_group):
    with pytest.raises(ep.InvalidArgumentError, match="expert_major.*NCCLGroup.*rank_major"):
        Exchange(rank_group(algorithm="ll", layout="expert_major"))
    exchange = Exchange(rank_group(algorithm="ll", layout="rank_major"))
    x, idx, w = inputs(4, 8, 32, 3, torch.float32, 3)
    with pytest.raises(ep.InvalidUsageError, match="topk_weights: requires grad.*rank-major"):
        exchange.dispatch(x, idx, w.requires_grad_())
    # Under torch.compile(fullgraph=True) torch reports an error raised in the traced code as its
    # own (Unsupported), whose text names ours: the error class is one its tracer can build.
    # (torch 2.13 writes InvalidUsageError('topk_weights: ...'), 2.11 InvalidUsageError((LazyVariableTracker(
    # realized: ConstantVariable(str: "topk_weights: ...")),)).)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, idx, w: exchange.dispatch(x, idx, w).tokens, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"(?s)InvalidUsageError\(.{0,80}topk_weights: requires grad.*rank-major"):
        compiled(x, idx, w)
    with torch.no_grad():   # no gradient asked for: it runs
        assert exchange.dispatch(x, idx, w).tokens.shape == tuple(exchange.group.recv_shape)
    exchange.close()


@pytest.mark.parametrize("zero_fill", [True, False])
def test_a_combine_of_a_step_whose_slot_was_reused_is_refused_and_leaves_the_slot_as_it_was(rank_group, zero_fill):
    group = rank_group(layout="expert_major_padded", alignment=4)
    exchange = Exchange(group, zero_fill=zero_fill)
    sent = [exchange.dispatch(*inputs(6, 8, 32, 3, torch.float32, s)) for s in range(3)]   # the third reuses the first's slot
    with pytest.raises(ep.InvalidUsageError, match="buffer slot 0"):
        exchange.combine(experts(sent[0], "expert_major_padded"), sent[0])
    # Cleared (zero_fill), or the third step's received weights: nothing of the refused step's.
    expected = torch.zeros_like(sent[2].topk_weights) if zero_fill else sent[2].topk_weights
    assert torch.equal(group._slots[0].weights, expected)
    exchange.combine(experts(sent[2], "expert_major_padded"), sent[2])   # the slot's own step combines
    assert torch.equal(group._slots[0].weights, expected)
    exchange.close()


@pytest.mark.parametrize("bad", ["shrunk", "sparse"])
def test_a_combine_refused_for_its_expert_outputs_leaves_the_slots_weights_cleared(rank_group, bad):
    # HT expert-major's combine puts the per-slot weights back into the slot first, and clears them
    # after (zero_fill), also when the call fails: expert_outputs whose memory the op cannot read
    # (a storage shrunk since, a sparse tensor) are refused after the weights went back.
    group = rank_group(layout="expert_major_padded", alignment=4)
    exchange = Exchange(group)
    sent = exchange.dispatch(*inputs(6, 8, 32, 3, torch.float32, 1))
    y = experts(sent, "expert_major_padded")
    if bad == "shrunk":
        y.untyped_storage().resize_(8)
    else:
        y = y.to_sparse()
    with pytest.raises(ep.InvalidArgumentError, match="storage of 8 bytes" if bad == "shrunk" else "sparse"):
        exchange.combine(y, sent)
    assert not group._slots[0].weights.any()
    exchange.close()
    del sent, y   # (the step retires now, while the fixture's stand-ins are in place: the error's traceback held it)
    gc.collect()


@pytest.mark.parametrize("algorithm,layout,weights_grad", CASES)
def test_the_ops_read_the_slots_own_tensors_not_those_a_direct_dispatch_handed_out(rank_group, algorithm, layout, weights_grad):
    """The ops copied the received routing and counts out of the slot through the tensors the
    group's results hand out (and HT padded's combine wrote the per-slot weights back through
    them): a caller of the group's own dispatch who rebound those (.data =, set_()) made the ops
    copy from, and write into, the caller's tensors instead of the slot."""
    settings = settings_of(algorithm, layout, "f32")
    group = rank_group(**settings)
    x, idx, w = inputs(4, group.experts, group.hidden, group.top_k, torch.float32, 7)
    for _ in range(2):   # each slot's handed-out tensors rebound
        out = group.dispatch(x, idx, w)
        if out.topk_idx is not None:
            out.topk_idx.data = torch.full_like(out.topk_idx, 3)
            out.topk_weights.set_(torch.full_like(out.topk_weights, 9.0))
        out.expert_counts.data = torch.full_like(out.expert_counts, 5)
        group.combine(out.tokens.clone(), out.handle)
    reference = ep.VirtualGroup(ranks=1, device="cpu", **settings)
    on_rank, on_reference = Exchange(group), Exchange(reference)
    compare_with_the_reference(on_rank, on_reference, weights_grad)
    on_rank.close()
    on_reference.close()
    reference.close()
