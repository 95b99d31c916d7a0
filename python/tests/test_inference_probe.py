"""Defects a vLLM / SGLang integrator's probe of the low-latency path met, each with the call that
showed it, on the CPU backend."""

import numpy as np
import pytest
import torch

import expert_parallel as ep

R, E, H, K, B = 4, 8, 16, 2, 4


def routing(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(R, B, H, generator=gen)
    idx = torch.stack([torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(B)]) for _ in range(R)]).int()
    w = torch.rand(R, B, K, generator=gen)
    return x, idx, w


def test_a_steps_layout_read_after_a_rank_was_masked_is_the_steps():
    # A handle dispatched with every rank active: its layout, read after deactivate(1), said rank 1
    # received nothing (the package read the group's current mask, not the step's).
    group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32")
    x, idx, w = routing()
    with group.handle() as h:
        out = group.dispatch(x, idx, w, handle=h)
        counts = out.expert_counts.tolist()
        group.deactivate(1)
        assert [info.expert_counters for info in out.layout] == counts
        assert out.layout[1].received_total == sum(counts[1]) > 0
    group.clean()


def test_a_masked_ranks_layout_in_a_later_step_is_empty():
    group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32")
    x, idx, w = routing()
    group.deactivate(1)
    out = group.dispatch(x, idx, w)
    assert out.layout[1].expert_counters == [0, 0] and out.layout[1].received_total == 0
    assert [info.expert_counters for info in out.layout] == out.expert_counts.tolist()


def test_fp8_configuration_errors_name_the_keywords():
    # "fp8Source = 'pass_through'; needs an fp8Scales mode": the C struct's fields.
    with pytest.raises(ep.InvalidArgumentError) as caught:
        ep.VirtualGroup(ranks=2, experts=4, hidden=128, top_k=2, max_tokens=2, dtype="bf16", fp8_source="pass_through")
    text = str(caught.value)
    assert "fp8_source = 'pass_through'; needs an fp8 mode" in text, text
    assert "fp8Source" not in text and "fp8Scales" not in text, text


def test_deep_ep_low_latency_ue8m0_scales_keep_every_block_of_a_hidden_size_not_a_multiple_of_512():
    # hidden 640 is 5 blocks of 128: two int32 words of exponents. The scales came back [L, R*Bmax, 1]
    # (hidden // 512 words): the fifth block's scale was dropped.
    from expert_parallel.compat.deep_ep import Buffer, run_ranks

    hidden, experts, bmax = 640, 4, 4
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, hidden, generator=gen).mul(torch.linspace(0.1, 40, hidden)).bfloat16() for _ in range(2)]
    idx = [torch.tensor([[0, 3], [1, 2], [2, 0]]), torch.tensor([[3, 1], [0, 2], [1, 3]])]
    buffers = Buffer.virtual(2, timeout=30)

    def flow(b):
        (codes, scales), count, _, _, _ = b.low_latency_dispatch(xs[b.rank], idx[b.rank], bmax, experts, round_scale=True,
                                                                 use_ue8m0=True)
        return codes.clone(), scales.clone(), count.clone()

    try:
        results = run_ranks(buffers, flow)
    finally:
        for b in buffers:
            b.destroy()
    for r, (codes, scales, count) in enumerate(results):
        assert scales.shape == (2, 2 * bmax, 2) and scales.dtype == torch.int32, scales.shape
        exponents = scales.contiguous().view(torch.uint8).reshape(2, 2 * bmax, 8)[..., :5].to(torch.int32)
        per_block = torch.pow(2.0, (exponents - 127).float()).repeat_interleave(128, dim=2)
        decoded = codes.float() * per_block
        for e, c in enumerate(count.tolist()):
            sources = [(s, t) for s in range(2) for t in range(3) if r * 2 + e in idx[s][t].tolist()]
            sent = torch.stack([xs[s][t] for s, t in sources]).float()
            assert torch.all((decoded[e, :c] - sent).abs() <= sent.abs() / 16 + per_block[e, :c] * 2 ** -9), (r, e)


@pytest.mark.parametrize("stacked", [True, False])
def test_a_results_layout_is_refused_once_its_handle_has_new_routing(stacked):
    # One handle per layer, reused every decode step: the first step's result.layout, read after
    # the handle's next dispatch, returned the next step's counts (the group's own step refused).
    group = ep.VirtualGroup(ranks=2, experts=8, hidden=16, top_k=2, max_tokens=4, dtype="f32")
    x, w = torch.randn(2, 4, 16), torch.rand(2, 4, 2)
    first, second = torch.tensor([[[0, 1]] * 4] * 2).int(), torch.tensor([[[6, 7]] * 4] * 2).int()
    args = (lambda t: t) if stacked else list
    with group.handle() as h:
        kept = group.dispatch(args(x), args(first), args(w), handle=h)
        assert [i.expert_counters for i in kept.layout] == [[8, 8, 0, 0], [0, 0, 0, 0]]   # read now: the step's
        late = group.dispatch(args(x), args(first), args(w), handle=h)
        again = group.dispatch(args(x), None, args(w), handle=h)   # the same routing: still that step
        assert [i.expert_counters for i in again.layout] == [[8, 8, 0, 0], [0, 0, 0, 0]]
        group.dispatch(args(x), args(second), args(w), handle=h)
        assert [i.expert_counters for i in kept.layout] == [[8, 8, 0, 0], [0, 0, 0, 0]]   # (read before: kept)
        with pytest.raises(ep.InvalidUsageError, match="layout: its handle has been updated with new routing"):
            late.layout


@pytest.mark.parametrize("numpy", [False, True])
def test_combining_a_step_dispatched_into_out_arrays_leaves_other_steps_results_alone(numpy):
    # Two-batch overlap with one micro-batch received into the caller's arrays: its combine (no
    # out=) wrote into the next buffer slot's combined rows, the result another live step's
    # combine had just returned.
    group = ep.VirtualGroup(ranks=2, experts=8, hidden=16, top_k=2, max_tokens=4, dtype="f32")
    gen = torch.Generator().manual_seed(5)

    def inputs():
        x, w = torch.randn(2, 4, 16, generator=gen), torch.rand(2, 4, 2, generator=gen)
        idx = torch.stack([torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(4)]) for _ in range(2)]).int()
        return (x.numpy(), idx.numpy(), w.numpy()) if numpy else (x, idx, w)

    a_in, b_in, c_in = inputs(), inputs(), inputs()
    with group.handle() as ha, group.handle() as hb, group.handle() as hc:
        a = group.dispatch(*a_in, handle=ha)                         # slot 0
        group.dispatch(*c_in, handle=hc)                             # slot 1
        mine = np.zeros((2,) + group.recv_shape, np.float32) if numpy else torch.zeros((2,) + group.recv_shape)
        group.dispatch(*b_in, handle=hb, out=(mine, None, None))     # the caller's: no slot
        ya = group.combine(a.received, ha)
        host = (lambda t: t.copy()) if numpy else (lambda t: t.numpy().copy())
        kept = [host(t) for t in ya]
        yb = group.combine(mine, hb)
        assert all(np.array_equal(host(t), k) for t, k in zip(ya, kept)), "the first step's combined rows changed"
        again = group.combine(mine, hb, out=[np.zeros((4, 16), np.float32) if numpy else torch.zeros(4, 16) for _ in range(2)])
        assert all(np.array_equal(host(p), host(q)) for p, q in zip(yb, again))


@pytest.mark.parametrize("bad", ["out dtype", "out shape", "weights shape", "x shape", "x dtype"])
def test_deep_ep_low_latency_combine_checks_a_ranks_own_out_and_weights_before_the_round(bad):
    # Rank 1's out= (or topk_weights) did not fit; the group found it in the round, so rank 0,
    # whose arguments were right, raised rank 1's InvalidArgumentError ("out[1]: dtype ...", a
    # list entry DeepEP code never passed) instead of a PeerFailedError naming rank 1.
    import threading

    from expert_parallel.compat.deep_ep import Buffer

    hidden, experts, bmax = 128, 4, 4
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(3, hidden, generator=gen).bfloat16() for _ in range(2)]
    idx = [torch.tensor([[0, 3], [1, 2], [2, -1]]), torch.tensor([[3, 1], [0, 2], [1, 3]])]
    ws = [torch.rand(3, 2, generator=gen) for _ in range(2)]
    buffers = Buffer.virtual(2, timeout=30)
    errors = [None, None]
    message = {"out dtype": "out: dtype torch.float32; must be torch.bfloat16, x's (the combine's element type)",
               "out shape": "out: shape [4, 128]; must be [3, 128]",
               "weights shape": "topk_weights: shape [3, 1]; must be [3, 2]",
               "x shape": "x: shape [2, 8, 64]; must be [2, 8, 128]",
               "x dtype": "x: dtype torch.float16; the handle's dispatch combines bf16"}[bad]

    def flow(b):
        r = b.rank
        recv_x, _, handle, _, _ = b.low_latency_dispatch(xs[r], idx[r], bmax, experts, use_fp8=False)
        out, w = torch.empty(3, hidden, dtype=torch.bfloat16), ws[r]
        if r == 1:
            if bad == "out dtype":
                out = torch.empty(3, hidden)
            elif bad == "out shape":
                out = torch.empty(4, hidden, dtype=torch.bfloat16)
            elif bad == "x shape":
                recv_x = recv_x[..., :64].contiguous()
            elif bad == "x dtype":
                recv_x, out = recv_x.half(), out.half()
            else:
                w = w[:, :1]
        try:
            b.low_latency_combine(recv_x, idx[r], w, handle, out=out)
        except ep.ExpertParallelError as error:
            errors[r] = error

    threads = [threading.Thread(target=flow, args=(b,)) for b in buffers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for b in buffers:
        b.destroy()
    assert type(errors[1]) is ep.InvalidArgumentError and str(errors[1]) == message, repr(errors[1])
    assert isinstance(errors[0], ep.PeerFailedError), repr(errors[0])
    assert str(errors[0]).endswith(f"InvalidArgumentError: {message}"), str(errors[0])


def test_a_timeout_of_numpys_float32_is_a_number_of_seconds():
    # timeout=np.float32(2.5) was refused as "must be a number of seconds" (integer options take NumPy's integers).
    group = ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32", timeout=np.float32(2.5))
    assert group.ranks == 2
    for wrong in (True, np.bool_(True), "2", None):
        with pytest.raises(ep.InvalidArgumentError, match="timeout=.*; must be a number of seconds"):
            ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32", timeout=wrong)


def test_a_step_keeps_its_per_rank_weights_when_the_caller_reuses_its_list():
    # LL expert-major combine reads the dispatch's topk_weights where they were. The handle kept
    # the caller's list object: replacing its entries after the dispatch (a list reused for the
    # next micro-batch) freed the tensors, and combine read freed memory.
    import gc
    import weakref

    group = ep.VirtualGroup(ranks=2, experts=8, hidden=16, top_k=2, max_tokens=4, dtype="f32")
    gen = torch.Generator().manual_seed(11)
    x = list(torch.randn(2, 4, 16, generator=gen))
    idx = list(torch.tensor([[[0, 5], [1, 2], [3, 7], [4, 6]]] * 2).int())
    ws = [torch.rand(4, 2, generator=gen) for _ in range(2)]
    out = group.dispatch(x, idx, ws)
    want = [t.clone() for t in group.combine(out.received, out.handle)]
    out = group.dispatch(x, idx, ws)
    held = [weakref.ref(w) for w in ws]
    for r in range(2):
        ws[r] = None
    gc.collect()
    assert all(ref() is not None for ref in held), "the step let go of the weights its combine reads"
    junk = [torch.full((4, 2), 1e6) for _ in range(64)]   # (memory the freed weights had)
    got = group.combine(out.received, out.handle)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), [(a - b).abs().max() for a, b in zip(got, want)]
    del junk


def test_a_send_only_combines_kept_per_rank_tensors_are_marked_in_use_by_the_completing_stream(monkeypatch):
    # complete() lets go of what the send-only combine's receiving half reads after marking each
    # CUDA tensor in use by its stream; per-rank lists were walked as if they were tensors, so
    # nothing was marked and the allocator could hand their memory out while the GPU still read it.
    from expert_parallel import _fast

    class Tensor:
        is_cuda = True

        def __init__(self):
            self.streams = []

        def record_stream(self, stream):
            self.streams.append(stream)

    group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32")
    monkeypatch.setattr(_fast, "torch_stream", lambda device, stream: ("stream", device, stream))
    rows, weights, stacked = (Tensor(), Tensor()), [Tensor(), None], Tensor()
    group._device, group._kept = 0, (rows, weights, stacked)
    group._release_kept(7)
    marked = [t.streams for t in (*rows, weights[0], stacked)]
    assert marked == [[("stream", 0, 7)]] * 4 and group._kept is None
