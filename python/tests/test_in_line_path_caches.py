"""What the in-line path of the common call (three stacked torch tensors, forward, one launch)
keeps from one call to the next, to skip work a decode loop repeats: each cache is compared by
value, so a call that differs from the cached one in any property (a shape, a dtype, the device,
contiguity, memory) is checked again, and refused by name where the general path refuses it."""

import numpy as np
import pytest

import expert_parallel as ep
from reference import random_routing

torch = pytest.importorskip("torch")

R, E, K, H, B = 2, 8, 2, 16, 4


def inputs(rng, b=B):
    x = torch.from_numpy(rng.standard_normal((R, b, H)).astype(np.float32))
    idx = torch.from_numpy(np.stack([random_routing(rng, b, E, K) for _ in range(R)]).astype(np.int32))
    w = torch.from_numpy(rng.random((R, b, K)).astype(np.float32))
    return x, idx, w


def groups():
    """A group whose in-line path counts the calls it leaves to the general path, and a group that
    always takes the general path (the reference bits)."""
    shape = dict(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32")
    fast, general = ep.VirtualGroup(**shape), ep.VirtualGroup(**shape)
    general._dispatch_common = general._combine_common = lambda *_: None
    return fast, general, counting(fast, "_stacked_parts")


def counting(group, name):
    """Wraps method `name` of `group` so that each call adds an entry to the list returned."""
    calls, method = [], getattr(group, name)

    def counted(*arguments):
        calls.append(1)
        return method(*arguments)

    setattr(group, name, counted)
    return calls


def received(group, x, idx, w):
    out = group.dispatch(x, idx, w)
    rows = out.received.clone()
    group.combine(out.received, out.handle)
    return out.handle.tokens, rows


def test_a_dispatch_unlike_the_cached_one_is_checked_again():
    """After a dispatch the in-line path took (and cached), a call that changes one property of
    one tensor is refused by name, or taken with its own B and routing type; the cached call
    then still takes the in-line path with the general path's bits."""
    rng = np.random.default_rng(3)
    fast, general, left = groups()
    x, idx, w = inputs(rng)
    assert received(fast, x, idx, w)[0] == [B, B] and not left

    refused = [
        ("xs", (x.double(), idx, w)),
        ("topk_weights", (x, idx, w.double())),
        ("topk_idx", (x, idx.float(), w)),
        ("xs", (torch.randn(R, H, B).transpose(1, 2), idx, w)),                              # same shape, not contiguous
        ("topk_idx", (x, idx.transpose(0, 1).contiguous().transpose(0, 1), w)),
        ("xs", (torch.empty(R, B, H, device="meta"), idx, w)),                               # no memory (get_device() -1, as the CPU's)
        ("topk_weights", (x, idx, torch.empty(R, B, K, device="meta"))),
        ("xs", (x[:, :, : H - 1], idx, w)),
        ("topk_idx", (x, idx[:, :, :1], w)),
        ("topk_weights", (x, idx, w[:, :3])),
        ("xs", (torch.zeros(R, B + 1, H), torch.zeros(R, B + 1, K, dtype=torch.int32), torch.zeros(R, B + 1, K))),
    ]
    for name, arguments in refused:
        with pytest.raises(ep.InvalidArgumentError, match=name):
            fast.dispatch(*arguments)
        tokens, rows = received(fast, x, idx, w)
        assert tokens == [B, B] and torch.equal(rows, received(general, x, idx, w)[1]), name
    left.clear()

    # Taken in line with their own B and routing type, and back to the cached call.
    for b, index_type in ((2, torch.int32), (B, torch.int64), (1, torch.int64), (B, torch.int32)):
        xb, idxb, wb = inputs(rng, b)
        idxb = idxb.to(index_type)
        tokens, rows = received(fast, xb, idxb, wb)
        assert tokens == [b, b]
        assert torch.equal(rows, received(general, xb, idxb.to(torch.int32), wb)[1]), (b, index_type)
    assert not left

    # New tensors of the cached call's properties (PyTorch's allocator may give the same
    # addresses): their own rows are read.
    for _ in range(3):
        x2, idx2, w2 = inputs(rng)
        assert torch.equal(received(fast, x2, idx2, w2)[1], received(general, x2, idx2, w2)[1])
    assert not left
    for g in (fast, general):
        g.check()
        g.close()


def test_a_combine_unlike_the_cached_one_is_checked_again():
    """After a combine the in-line path took (and cached), expert outputs that differ in one
    property are refused by name; new tensors of the cached one's properties are read, each its
    own rows, and each result is a list of its own."""
    rng = np.random.default_rng(4)
    fast, general, _ = groups()
    left = counting(fast, "_combine_stacked")
    x, idx, w = inputs(rng)
    shape = (R,) + tuple(fast.recv_shape)

    def combined(group, ys):
        out = group.dispatch(x, idx, w)
        return [t.clone() for t in group.combine(ys, out.handle)]

    ys = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    first = combined(fast, ys)
    assert not left
    refused = [
        ys.double(),
        torch.from_numpy(rng.standard_normal(shape[:-1] + (H + 1,)).astype(np.float32))[..., :H],   # not contiguous
        torch.empty(shape, device="meta"),
        ys[:, :-1],
        ys.reshape((R, -1)),
    ]
    for bad in refused:
        out = fast.dispatch(x, idx, w)
        with pytest.raises(ep.InvalidArgumentError, match="expert_outputs"):
            fast.combine(bad, out.handle)
        mine = combined(fast, ys)
        assert all(torch.equal(a, c) for a, c in zip(mine, first)), bad.shape
    left.clear()
    for _ in range(3):
        y2 = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        out = fast.dispatch(x, idx, w)
        a, b = fast.combine(y2, out.handle), fast.combine(y2, out.handle)
        assert a is not b and a[0] is b[0]   # (the slot's views, in lists of their own)
        want = combined(general, y2)
        assert all(torch.equal(c, d) for c, d in zip(a, want))
    assert not left
    for g in (fast, general):
        g.check()
        g.close()


def test_the_common_calls_one_write_leaves_set_writing_what_differs():
    """StackedCall.dispatch_arguments / combine_arguments write their inputs at once (a decode
    loop's new addresses each call) and keep set()'s record of what each field holds: a later
    set() of another value writes it, and the common call after it writes its own again."""
    from expert_parallel import _abi, _fast

    def held(call, name):
        field = getattr(call.struct, name)
        return (field.data or 0, field.dtype, field.device, field.rankStride)

    d = _fast.StackedCall(_abi.StackedDispatch, 0)
    d.set("inputTokens", 4096, _abi.F32)
    d.set("receivedTokens", 1 << 40, _abi.F32)
    for x in (8192, 16384, 8192):
        d.dispatch_arguments(x, _abi.BF16, 24576, _abi.I64, 32768, 7, _abi.PHASE_WHOLE, None)
        assert [held(d, n) for n in ("inputTokens", "topkIdx", "topkWeights")] == [
            (x, _abi.BF16, 0, 0), (24576, _abi.I64, 0, 0), (32768, _abi.F32, 0, 0)]
        assert d.struct.tokens == 7 and held(d, "receivedTokens") == (1 << 40, _abi.F32, 0, 0)
        d.set("inputTokens", 4096, _abi.F32)   # what set() wrote before the common call: written again
        assert held(d, "inputTokens") == (4096, _abi.F32, 0, 0)
    d.dispatch_arguments(4096, _abi.F32, 24576, _abi.I64, 32768, 7, _abi.PHASE_WHOLE, None)
    d.set("topkIdx", 24576, _abi.I32)
    d.dispatch_arguments(4096, _abi.F32, 24576, _abi.I64, 32768, 7, _abi.PHASE_WHOLE, None)   # (set() voided the record)
    assert held(d, "topkIdx") == (24576, _abi.I64, 0, 0)

    c = _fast.StackedCall(_abi.StackedCombine, -1)
    c.set("topkWeights", 512, _abi.F32)
    for weights, holds in ((None, 512), (1024, 1024), (None, 1024)):   # (None: the call's kind set them)
        c.combine_arguments(2048, _abi.BF16, weights, _abi.PHASE_WHOLE, None)
        assert held(c, "expertOutputs") == (2048, _abi.BF16, -1, 0)
        assert held(c, "topkWeights") == (holds, _abi.F32, -1, 0)
        c.set("expertOutputs", 64, _abi.BF16)
        assert held(c, "expertOutputs") == (64, _abi.BF16, -1, 0)
    c.set("topkWeights", 512, _abi.F32)
    assert held(c, "topkWeights") == (512, _abi.F32, -1, 0)
    r = _fast.StackedCall(_abi.StackedCombine, 0)   # an NCCL rank's combine: its five arguments at once
    r.set("combinedTokens", 4096, _abi.BF16)
    for combined in (8192, 12288):
        r.rank_combine(2048, _abi.BF16, 1024, 0, combined, 0, 0, _abi.PHASE_WHOLE, None)
        assert [held(r, n) for n in ("expertOutputs", "topkWeights", "weightGradients", "combinedTokens", "topkWeightGradients")] == [
            (2048, _abi.BF16, 0, 0), (1024, _abi.F32, 0, 0), (0, _abi.F32, 0, 0), (combined, _abi.BF16, 0, 0), (0, _abi.F32, 0, 0)]
        r.set("combinedTokens", 4096, _abi.BF16)
        assert held(r, "combinedTokens") == (4096, _abi.BF16, 0, 0)


def test_the_in_line_dispatchs_handle_has_every_field_a_handle_has():
    """The decode loop's dispatch makes its handle field by field (_results.own_step_result):
    every field a Handle made the usual way has is set there too (an unset slot reads as an
    AttributeError)."""
    from expert_parallel._results import Handle

    rng = np.random.default_rng(3)
    g = ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32")
    x = torch.from_numpy(rng.standard_normal((2, 3, 8)).astype(np.float32))
    idx = torch.from_numpy(np.stack([random_routing(rng, 3, 4, 2) for _ in range(2)]))
    w = torch.from_numpy(rng.random((2, 3, 2)).astype(np.float32))
    handle = g.dispatch(x, idx, w).handle
    fields = [name for name in Handle.__slots__ if name != "__weakref__"]
    assert [name for name in fields if not hasattr(handle, name)] == []
    assert [name for name in fields if not hasattr(Handle(g), name)] == []
    g.close()
