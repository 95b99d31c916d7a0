"""The torch ops' calls into a VirtualGroup (VirtualGroup._dispatch_fresh / _combine_fresh) read
only the addresses of what the ops checked and made, and write the call's arguments at once: they
must write the very call that dispatch() / combine() write for the same arguments, and what they
keep between calls (the group's call structs, the registry entry's shapes) must follow whatever
changes between calls: B, the routing's dtype, the group's state, another group."""

import ctypes

import pytest
import torch

import expert_parallel as ep
from expert_parallel import _abi
from expert_parallel.torch import Exchange
from test_torch_autograd import LAYOUTS, exchange, run
from torch_moe import over_group, routing

R, E, K, H, B = 4, 16, 3, 8, 5


def record_calls(group, calls):
    """Records the epStackedDispatch_t / epStackedCombine_t bytes each stacked call of `group` is
    given, then makes the call."""
    for name, struct in (("_fn_dispatch_stacked", _abi.StackedDispatch), ("_fn_combine_stacked", _abi.StackedCombine)):
        real, size = getattr(group, name), ctypes.sizeof(struct)

        def call(group_address, address, stream, real=real, size=size):
            calls.append(ctypes.string_at(address, size))
            return real(group_address, address, stream)

        setattr(group, name, call)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_each_fresh_call_writes_the_call_the_general_path_writes(algorithm, layout):
    """Forward and backward, every layout: each fresh call is followed by dispatch() / combine()
    with the same arguments, whose call's bytes must be the same (the library then runs the call
    twice, which gives the same rows); the results are those of an exchange that only made the
    fresh calls, bit for bit."""
    inputs = routing(21, R, B, E, K, H)
    want = run(lambda *a: over_group(exchange(algorithm, layout), *a), inputs)
    ex = exchange(algorithm, layout)
    group, calls, pairs = ex.group, [], []
    record_calls(group, calls)

    def twice(fresh, general):
        def call(*args, **options):
            start = len(calls)
            fresh(*args, **options)
            general(*args, **options)
            pairs.append(calls[start:])
        return call

    group._dispatch_fresh = twice(group._dispatch_fresh, lambda xs, idx, w, handle, direction, out: group.dispatch(
        xs, idx, w, handle=handle, direction=direction, out=out))
    group._combine_fresh = twice(group._combine_fresh, lambda ys, handle, out, **options: group.combine(ys, handle, out=out, **options))
    got = run(lambda *a: over_group(ex, *a), inputs)
    assert len(pairs) == 4   # dispatch, combine and their backward calls
    for made in pairs:
        assert len(made) == 2 and made[0] == made[1]
    for name, a, b in zip(("combined", "grad x", "grad topk_weights", "grad experts"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["expert_major", "rank_major"])
def test_a_general_call_after_a_fresh_one_writes_its_own_arguments(layout):
    """dispatch() / combine() into the caller's stacked outputs write only the fields that differ
    from what they wrote last (StackedCall.set): a fresh call between them rewrites the same call
    struct, so the next general call must write its arguments again, not trust its record."""
    group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32", layout=layout)
    calls = []
    for name in ("_fn_dispatch_stacked", "_fn_combine_stacked"):   # (nothing runs: the calls' bytes are what is compared)
        setattr(group, name, lambda group_address, address, stream, size=ctypes.sizeof(_abi.StackedDispatch
                if name == "_fn_dispatch_stacked" else _abi.StackedCombine): calls.append(ctypes.string_at(address, size)) or 0)
    handle = group.handle()
    x, idx, w, _ = routing(22, R, B, E, K, H)
    carried = layout == "rank_major"

    def outputs():
        routing_shape = (R,) + tuple(group.recv_routing_shape) if carried else None
        return (torch.empty((R,) + tuple(group.recv_shape)), torch.empty(routing_shape, dtype=torch.int32) if carried else None,
                torch.empty(routing_shape) if carried else None, torch.empty((R, group.local_experts), dtype=torch.int32))

    first, second = outputs(), outputs()
    group.dispatch(x, idx, w, handle=handle, out=first)
    group._dispatch_fresh(x.clone(), idx.clone(), w.clone(), handle, "forward", second)
    group.dispatch(x, idx, w, handle=handle, out=first)
    assert calls[0] == calls[2] != calls[1]
    calls.clear()
    ys, combined = [torch.zeros((R,) + tuple(group.recv_shape)) for _ in range(2)], [torch.empty(R, B, H) for _ in range(2)]
    weights = {"topk_weights": w} if layout == "expert_major" else {}
    group.combine(ys[0], handle, out=combined[0], **weights)
    group._combine_fresh(ys[1], handle, combined[1], **({"topk_weights": w.clone()} if weights else {}))
    group.combine(ys[0], handle, out=combined[0], **weights)
    assert calls[0] == calls[2] != calls[1]


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_changes_between_calls_are_followed(algorithm, layout):
    """Each call of one exchange with another B (0 included), another routing dtype, and after a
    masked rank was cleaned, gives what the group's own calls give for it, bit for bit."""
    ex = exchange(algorithm, layout)
    plain = exchange(algorithm, layout).group
    carried = layout != "expert_major"
    for seed, tokens, index_type in ((30, B, torch.int64), (31, 2, torch.int32), (32, 0, torch.int64), (33, B, torch.int32),
                                     (34, 1, torch.int64)):
        x, idx, w, _ = routing(seed, R, B, E, K, H)
        x, idx, w = x[:, :tokens].contiguous(), idx[:, :tokens].to(index_type).contiguous(), w[:, :tokens].contiguous()
        with torch.no_grad():
            sent = ex.dispatch(x, idx, w)
            got = ex.combine(sent.tokens * 2, sent)
        received = torch.zeros_like(sent.tokens)   # (the group's own outputs, zeroed as the exchange's are)
        routed = (torch.zeros_like(sent.topk_idx), torch.zeros_like(sent.topk_weights)) if carried else (None, None)
        out = plain.dispatch(x, idx, w, out=(received,) + routed + (torch.zeros_like(sent.expert_counts),))
        assert torch.equal(sent.tokens, received) and torch.equal(sent.expert_counts, out.expert_counts), (seed, "tokens")
        if carried:
            assert torch.equal(sent.topk_idx, routed[0]) and torch.equal(sent.topk_weights, routed[1]), (seed, "routing")
        want = plain.combine(received * 2, out.handle, **({"topk_weights": w} if layout == "expert_major" else {}))
        assert torch.equal(got, torch.stack(list(want)) if isinstance(want, list) else want), (seed, "combined")
        if seed == 31:   # a rank masked, then cleaned, between calls
            ex.group.deactivate(1)
            with pytest.raises(ep.InactiveRankError, match=r"rank\(s\) \[1\] masked inactive"):
                ex.dispatch(x, idx, w)
            ex.group.clean()


def test_two_groups_in_turn_keep_their_own_calls():
    """Two exchanges (of groups of other sizes) called in turn, each with its own routing: each
    call is its group's, with that group's shapes."""
    small, large = exchange("ll", "expert_major"), Exchange(ep.VirtualGroup(
        ranks=2, experts=8, hidden=4, top_k=2, max_tokens=3, dtype="f32"), zero_fill=True)
    for seed in range(3):
        for ex in (small, large):
            g = ex.group
            x, idx, w, _ = routing(40 + seed, g.ranks, g.max_tokens, g.experts, g.top_k, g.hidden)
            with torch.no_grad():
                sent = ex.dispatch(x, idx, w)
                got = ex.combine(sent.tokens, sent)
            assert sent.tokens.shape == (g.ranks,) + tuple(g.recv_shape)
            out = g.dispatch(x, idx, w)
            assert torch.equal(got, torch.stack(list(g.combine(out.received, out.handle))))
