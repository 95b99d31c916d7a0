"""Defects a Megatron / SGLang engineer's probe of DeepEP's intranode ("normal", high-throughput)
path in the compat layer met, each with the call that showed it, on the CPU backend."""

import threading

import pytest
import torch

import expert_parallel as ep
from deep_ep_reference import make_inputs
from expert_parallel.compat.deep_ep import Buffer

R, E, H, K = 2, 8, 128, 2


def ranks_apart(buffers, flow):
    """Runs ``flow(buffer)`` on a thread per rank; returns (results, errors) in rank order."""
    results, errors = [None] * len(buffers), [None] * len(buffers)

    def work(b):
        try:
            results[b.rank] = flow(b)
        except Exception as error:  # (the test looks at each rank's)
            errors[b.rank] = error

    threads = [threading.Thread(target=work, args=(b,)) for b in buffers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return results, errors


def dispatch(b, x, idx, w, **keywords):
    per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(idx, E)
    return b.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                      topk_idx=idx, topk_weights=w, **keywords)


@pytest.mark.parametrize("bad", ["x rows", "x hidden", "x dtype", "weights shape"])
def test_combine_checks_a_ranks_own_x_and_topk_weights_before_the_round(bad):
    # Rank 1's x (or topk_weights) did not fit its handle; the group found it in the round, so
    # rank 0, whose arguments were right, raised rank 1's error ("x: shape ... on rank 1")
    # instead of a PeerFailedError naming rank 1.
    xs, idx, ws = make_inputs(3, [5, 4], E, H, K, minus_one_rate=0.0)
    buffers = Buffer.virtual(R, timeout=30)
    expected = {}

    def flow(b):
        r = b.rank
        recv_x, _, recv_w, _, handle, _ = dispatch(b, xs[r], idx[r], ws[r])
        y, w = recv_x, recv_w
        n = recv_x.shape[0]
        if r == 1:
            if bad == "x rows":
                y = torch.zeros(n + 1, H, dtype=torch.bfloat16)
                expected[1] = f"x: shape [{n + 1}, {H}]; must be [{n}, {H}], the rows its dispatch returned"
            elif bad == "x hidden":
                y = torch.zeros(n, H // 2, dtype=torch.bfloat16)
                expected[1] = f"x: shape [{n}, {H // 2}]; must be [{n}, {H}], the rows its dispatch returned"
            elif bad == "x dtype":
                y = recv_x.float()
                expected[1] = "x: dtype torch.float32; the handle's dispatch combines bf16"
            else:
                w = recv_w[:, :1].contiguous()
                expected[1] = f"topk_weights: shape [{n}, 1]; must be [{n}, {K}], the recv_topk_weights its dispatch returned"
        return b.combine(y, handle, topk_weights=w)

    _, errors = ranks_apart(buffers, flow)
    for b in buffers:
        b.destroy()
    assert type(errors[1]) is ep.InvalidArgumentError and str(errors[1]) == expected[1], repr(errors[1])
    assert isinstance(errors[0], ep.PeerFailedError), repr(errors[0])
    assert str(errors[0]).endswith(f"InvalidArgumentError: {expected[1]}"), str(errors[0])


def test_combine_after_a_failed_rank_meets_again():
    # The ranks stay in step after one rank's combine failed its own checks: the same combine,
    # right on every rank, then runs.
    xs, idx, ws = make_inputs(4, [5, 4], E, H, K, minus_one_rate=0.0)
    buffers = Buffer.virtual(R, timeout=30)

    def flow(b):
        r = b.rank
        recv_x, _, _, _, handle, _ = dispatch(b, xs[r], idx[r], ws[r])
        try:
            b.combine(recv_x[:-1].contiguous() if r == 1 else recv_x, handle)
        except ep.ExpertParallelError:
            pass
        return b.combine(recv_x, handle)[0]

    results, errors = ranks_apart(buffers, flow)
    for b in buffers:
        b.destroy()
    assert errors == [None, None]
    assert all(tuple(y.shape) == (x.shape[0], H) for y, x in zip(results, xs))


@pytest.mark.parametrize("ranks", [2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_dispatch_out_of_one_array_is_refused_saying_what_out_must_be(ranks, kind):
    # out= given as one [R, *recv_shape] array (as combine's out= may be): for R of 3 to 5 it was
    # unpacked along dimension 0 into (tokens, topk_idx, topk_weights[, ...]) and refused as
    # "out tokens: 12 entries; must be one tensor per rank (3)", which is not what was wrong.
    import numpy as np

    group = ep.VirtualGroup(ranks=ranks, experts=2 * ranks, hidden=16, top_k=2, max_tokens=4, dtype="f32", algorithm="ht")
    gen = torch.Generator().manual_seed(ranks)
    x = torch.randn(ranks, 4, 16, generator=gen)
    idx = torch.stack([torch.stack([torch.randperm(2 * ranks, generator=gen)[:2] for _ in range(4)]) for _ in range(ranks)]).int()
    w = torch.rand(ranks, 4, 2, generator=gen)
    shape = (ranks,) + tuple(group.recv_shape)
    out = torch.zeros(shape) if kind == "torch" else np.zeros(shape, np.float32)
    with pytest.raises(ep.InvalidArgumentError) as caught:
        group.dispatch(x, idx, w, out=out)
    assert str(caught.value).startswith(
        f"out: a {type(out).__name__} of shape {list(shape)}; must be a tuple (tokens, topk_idx, topk_weights)"), str(caught.value)
    # the tuple of stacked arrays the message asks for is taken
    mine = (torch.zeros(shape), torch.zeros((ranks,) + tuple(group.recv_routing_shape), dtype=torch.int32),
            torch.zeros((ranks,) + tuple(group.recv_routing_shape)))
    result = group.dispatch(x, idx, w, out=mine)
    assert result.tokens[0].data_ptr() == mine[0][0].data_ptr()
    group.close()


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("form", ["one array", "per-rank list"])
def test_backward_ht_combine_out_not_a_pair_is_refused_saying_what_out_must_be(ranks, form):
    # The backward pass of HT takes out=(tokens, topk_weight_gradients). One [R, B, hidden] array
    # at R = 2 was unpacked along dimension 0 ("out: 4 entries; must be one tensor per rank (2)"),
    # and a per-rank list of 2 tensors passed as the pair ("out: shape [4, 16]; must be [2, 4, 16]").
    group = ep.VirtualGroup(ranks=ranks, experts=2 * ranks, hidden=16, top_k=2, max_tokens=4, dtype="f32", algorithm="ht")
    gen = torch.Generator().manual_seed(ranks)
    x = torch.randn(ranks, 4, 16, generator=gen)
    idx = torch.stack([torch.stack([torch.randperm(2 * ranks, generator=gen)[:2] for _ in range(4)]) for _ in range(ranks)]).int()
    w = torch.rand(ranks, 4, 2, generator=gen)
    result = group.dispatch(x, idx, w)
    grads = torch.zeros((ranks,) + tuple(group.recv_routing_shape))
    y = torch.zeros((ranks,) + tuple(group.recv_shape))
    out = torch.zeros(ranks, 4, 16) if form == "one array" else [torch.zeros(4, 16) for _ in range(ranks)]
    with pytest.raises(ep.InvalidArgumentError) as caught:
        group.combine(y, result.handle, direction="backward", weight_gradients=grads, out=out)
    message = str(caught.value)
    assert message.startswith("out: a ") and "the backward pass of HT takes a pair (tokens, topk_weight_gradients)" in message, message
    # the pair is taken, stacked or per rank
    pair = (torch.full((ranks, 4, 16), 7.0), torch.full((ranks, 4, 2), 7.0))
    combined, g = group.combine(y, result.handle, direction="backward", weight_gradients=grads, out=pair)
    assert float(pair[0].abs().max()) == 0.0 and float(pair[1].abs().max()) == 0.0
    pair = ([torch.full((4, 16), 7.0) for _ in range(ranks)], [torch.full((4, 2), 7.0) for _ in range(ranks)])
    group.combine(y, result.handle, direction="backward", weight_gradients=grads, out=pair)
    assert all(float(t.abs().max()) == 0.0 for t in pair[0] + pair[1])
    group.close()


@pytest.mark.parametrize("bad", ["x rows", "not a handle", "a low-latency handle"])
def test_a_cached_dispatch_checks_a_ranks_own_x_and_handle_before_the_round(bad):
    # The backward pass of combine (dispatch with handle=): rank 1's x with another token count than
    # its handle's dispatch, or a handle that is not dispatch's, was found by the group inside the
    # round, so rank 0 raised "x: 3 tokens on rank 1; ..." too instead of a PeerFailedError.
    xs, idx, ws = make_inputs(5, [5, 4], E, H, K, minus_one_rate=0.0)
    buffers = Buffer.virtual(R, timeout=30)
    expected = {"x rows": "x: 3 tokens; the handle's dispatch had 4",
                "not a handle": "handle: a object; must be the handle dispatch returned",
                "a low-latency handle": "handle: a DispatchHandle; must be the handle dispatch returned"}[bad]

    def flow(b):
        r = b.rank
        _, _, _, _, handle, _ = dispatch(b, xs[r], idx[r], ws[r])
        _, _, ll_handle, _, _ = b.low_latency_dispatch(xs[r], idx[r], 8, E, use_fp8=False)
        x = xs[r]
        if r == 1:
            if bad == "x rows":
                x = x[:-1]
            else:
                handle = object() if bad == "not a handle" else ll_handle
        return b.dispatch(x, handle=handle)

    _, errors = ranks_apart(buffers, flow)
    for b in buffers:
        b.destroy()
    assert type(errors[1]) is ep.InvalidArgumentError and str(errors[1]) == expected, repr(errors[1])
    assert isinstance(errors[0], ep.PeerFailedError), repr(errors[0])
    assert str(errors[0]).endswith(f"InvalidArgumentError: {expected}"), str(errors[0])


@pytest.mark.parametrize("call", ["combine", "cached dispatch", "low_latency_combine"])
def test_a_rank_passing_its_peers_handle_is_refused_by_name(call):
    # Virtual ranks share a process, so a rank may pick up its peer's handle (a list of handles
    # indexed by the wrong rank). Where the shapes fit, it ran as the rank's own: rank 0 combined
    # rank 1's rows into its tokens, silently.
    tokens = [5, 4]
    xs, _, ws = make_inputs(6, tokens, E, H, K)
    idx = [torch.tensor([[0, 4]] * b) for b in tokens]   # every token to both ranks: both receive 9 rows
    buffers = Buffer.virtual(R, timeout=30)
    handles, barrier = [None, None], threading.Barrier(R)
    expected = {0: "handle: rank 1's; this Buffer is rank 0: pass the handle its own dispatch returned",
                1: "handle: rank 0's; this Buffer is rank 1: pass the handle its own dispatch returned"}

    def flow(b):
        r = b.rank
        if call == "low_latency_combine":
            recv_x, _, handles[r], _, _ = b.low_latency_dispatch(xs[r], idx[r], 8, E, use_fp8=False)
        else:
            recv_x, _, _, _, handles[r], _ = dispatch(b, xs[r], idx[r], ws[r])
        barrier.wait()
        peer = handles[1 - r]
        if call == "combine":
            return b.combine(recv_x, peer)
        if call == "cached dispatch":
            return b.dispatch(xs[1 - r], handle=peer)
        return b.low_latency_combine(recv_x, idx[r], ws[r], peer)

    _, errors = ranks_apart(buffers, flow)
    for b in buffers:
        b.destroy()
    for r in range(R):
        assert type(errors[r]) is ep.InvalidArgumentError and str(errors[r]) == expected[r], repr(errors[r])


def test_a_previous_event_that_is_no_event_is_refused_by_name():
    # previous_event=3 was ignored on the CPU and handed to torch's wait_event on a GPU (a raw
    # TypeError there); the failing rank now gets its own error and its peer a PeerFailedError.
    xs, idx, ws = make_inputs(3, [5, 4], E, H, K, minus_one_rate=0.0)
    buffers = Buffer.virtual(R, timeout=30)

    def flow(b):
        return dispatch(b, xs[b.rank], idx[b.rank], ws[b.rank], previous_event=3 if b.rank == 1 else None)

    _, errors = ranks_apart(buffers, flow)
    assert isinstance(errors[1], ep.InvalidArgumentError) and "previous_event: a int (3)" in str(errors[1])
    assert isinstance(errors[0], ep.PeerFailedError)
    with pytest.raises(ep.InvalidArgumentError, match="previous_event: a str"):
        buffers[0].get_dispatch_layout(idx[0], E, previous_event="event")
