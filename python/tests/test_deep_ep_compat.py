"""expert_parallel.compat.deep_ep on the CPU backend: DeepEP's intranode and low-latency flows at
R = 4 virtual ranks (one thread per rank) and at R = 1 under torch.distributed (gloo), compared
bit for bit with plain-PyTorch references written from DeepEP's documented semantics; FP8, hooks,
events, the cached dispatch of the backward pass, and the named errors."""

import gc
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import deep_ep_flows as flows
import deep_ep_reference as ref
import expert_parallel as ep
from expert_parallel.compat.deep_ep import Buffer, Config, EventOverlap, NotSupportedError, run_ranks, topk_idx_t

R, E, H, K = 4, 16, 64, 3
TOKENS = [5, 0, 9, 7]   # rank 1 sends nothing


@pytest.fixture(scope="module")
def ranks():
    yield from flows.virtual_buffers(R, timeout=30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("async_finish", [False, True])
def test_intranode_flow_matches_the_reference(ranks, dtype, async_finish):
    xs, idx, ws = ref.make_inputs(1, TOKENS, E, H, K, dtype)
    results = flows.intranode(ranks, xs, idx, ws, E, alignment=4, async_finish=async_finish)
    flows.check_intranode(results, xs, idx, ws, E, alignment=4)


@pytest.mark.parametrize("hook", [False, True])
def test_low_latency_flow_matches_the_reference(ranks, hook):
    xs, idx, ws = ref.make_inputs(2, TOKENS, E, H, K)
    results = flows.low_latency(ranks, xs, idx, ws, E, max_tokens=12, hook=hook, async_finish=hook)
    flows.check_low_latency(results, xs, idx, ws, E, max_tokens=12)


def test_low_latency_combine_takes_its_own_weights_and_drops_ids_set_to_minus_one(ranks):
    """The combine applies the weights it is given (float32 as they are, bf16 converted), not the
    dispatch's; an id set to -1 in the routing given to combine selects nothing there."""
    xs, idx, ws = ref.make_inputs(6, TOKENS, E, H, K)
    local = E // R
    masked = [torch.where(torch.arange(K) == 0, -1, i) for i in idx]   # each token's first selection dropped at combine
    other = [w.flip(1).contiguous() for w in ws]

    def rank_flow(b):
        r = b.rank
        recv_x, count, handle, _, _ = b.low_latency_dispatch(xs[r], idx[r], 12, E, use_fp8=False)
        y = ref.ll_expert_function(recv_x, r, local)
        same = b.low_latency_combine(y, idx[r], other[r], handle)[0].clone()
        halved = b.low_latency_combine(y, idx[r], other[r].to(torch.bfloat16), handle)[0].clone()
        dropped = b.low_latency_combine(y, masked[r], other[r], handle)[0].clone()
        wide = torch.cat([other[r], other[r]], dim=1)[:, :K]   # not contiguous: as good as contiguous weights
        strided = b.low_latency_combine(y, idx[r], wide, handle)[0].clone()
        # The dispatch's own routing tensor, its first selections set to -1 in place since: dropped too.
        mine = idx[r].clone()
        recv_x, _, handle, _, _ = b.low_latency_dispatch(xs[r], mine, 12, E, use_fp8=False)
        mine[:, 0] = -1
        in_place = b.low_latency_combine(ref.ll_expert_function(recv_x, r, local), mine, other[r], handle)[0].clone()
        return same, halved, dropped, strided, in_place

    results = run_ranks(ranks, rank_flow, timeout=30)
    want = ref.ll_combine(xs, idx, other, E, xs[0].dtype)
    want_bf16 = ref.ll_combine(xs, idx, [w.to(torch.bfloat16).float() for w in other], E, xs[0].dtype)
    want_dropped = ref.ll_combine(xs, masked, other, E, xs[0].dtype)
    for r, (same, halved, dropped, strided, in_place) in enumerate(results):
        assert torch.equal(same, want[r]) and torch.equal(halved, want_bf16[r]) and torch.equal(dropped, want_dropped[r]), r
        assert torch.equal(strided, want[r]) and torch.equal(in_place, want_dropped[r]), r
    assert any(not torch.equal(a, b) for a, b in zip(want, want_dropped) if a.numel())


def test_one_rank_under_torch_distributed_gloo(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        buffer = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, device="cpu")   # (the CPU backend also where CUDA is)
        assert (buffer.rank, buffer.group_size, buffer.device) == (0, 1, "cpu")
        xs, idx, ws = ref.make_inputs(3, [11], 8, H, 2)
        flows.check_intranode(flows.intranode([buffer], xs, idx, ws, 8), xs, idx, ws, 8)
        xs, idx, ws = ref.make_inputs(4, [6], 8, H, 2)
        flows.check_low_latency(flows.low_latency([buffer], xs, idx, ws, 8, max_tokens=8, hook=True), xs, idx, ws, 8, 8)
        # A call that fails its checks just raises (no peers to tell); the next calls work.
        with pytest.raises(ep.InvalidArgumentError, match=r"^x: 6 tokens; must be ≤ num_max_dispatch_tokens_per_rank \(2\)$"):
            buffer.low_latency_dispatch(xs[0], idx[0], 2, 8, use_fp8=False)
        flows.check_low_latency(flows.low_latency([buffer], xs, idx, ws, 8, max_tokens=8), xs, idx, ws, 8, 8)
        buffer.destroy()
        with pytest.raises(ep.InvalidUsageError, match="destroyed"):
            buffer.get_dispatch_layout(idx[0], 8)
        with pytest.raises(NotSupportedError, match="comm"):
            Buffer(dist.group.WORLD, comm=object())
    finally:
        dist.destroy_process_group()


def on_every_rank(ranks, call):
    """`call(buffer)` on every virtual rank (a thread each), raising the root cause. A collective
    call whose checks fail on one rank still takes that rank's round (the others then fail it by
    name, at once): calls that fail their checks are made on every rank, so the ranks stay in step."""
    return run_ranks(ranks, call, timeout=30)


def layout_and_dispatch(buffer, x, i, w, **extra):
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(i, E)
    return buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                           topk_idx=i, topk_weights=w, **extra)


def test_num_worst_tokens_pads_rows_without_a_count_list(ranks):
    xs, idx, ws = ref.make_inputs(5, TOKENS, E, H, K)
    want = ref.ht_dispatch(xs, idx, ws, E)
    worst = sum(TOKENS)
    results = run_ranks(ranks, lambda b: layout_and_dispatch(b, xs[b.rank], idx[b.rank], ws[b.rank], num_worst_tokens=worst))
    for r, (recv_x, recv_idx, recv_w, counts, handle, _) in enumerate(results):
        n = want[r]["x"].shape[0]
        assert counts == [] and recv_x.shape == (worst, H) and recv_idx.shape == (worst, K)
        assert torch.equal(recv_x[:n], want[r]["x"]) and torch.equal(recv_idx[:n], want[r]["idx"])
        assert (recv_idx[n:] == -1).all() and not recv_w[n:].any() and not recv_x[n:].float().any()
    with pytest.raises(ep.InvalidArgumentError, match="num_worst_tokens=1; rank"):
        run_ranks(ranks, lambda b: layout_and_dispatch(b, xs[b.rank], idx[b.rank], ws[b.rank], num_worst_tokens=1))

    # As in DeepEP, the handle has num_worst_tokens rows: a cached dispatch returns that many, and
    # combine takes that many (the padding rows are not read), combining as without the padding.
    def padded_then_plain(b):
        recv_x, _, recv_w, _, handle, _ = layout_and_dispatch(b, xs[b.rank], idx[b.rank], ws[b.rank], num_worst_tokens=worst)
        again = b.dispatch(xs[b.rank], handle=handle)[0]
        padded = b.combine(recv_x, handle, topk_weights=recv_w)[:2]
        recv_x, _, recv_w, _, handle, _ = layout_and_dispatch(b, xs[b.rank], idx[b.rank], ws[b.rank])
        return again.shape, padded, b.combine(recv_x, handle, topk_weights=recv_w)[:2]

    for shape, (x_pad, w_pad), (x_plain, w_plain) in run_ranks(ranks, padded_then_plain):
        assert shape == (worst, H)
        assert torch.equal(x_pad, x_plain) and torch.equal(w_pad, w_plain)


def test_combine_adds_one_or_two_biases(ranks):
    xs, idx, ws = ref.make_inputs(6, TOKENS, E, H, K, torch.float32)
    want = ref.ht_dispatch(xs, idx, ws, E)
    sums = ref.ht_combine(want, [w["x"] for w in want], TOKENS, torch.float32)

    def flow(b):
        recv_x, _, _, _, handle, _ = layout_and_dispatch(b, xs[b.rank], idx[b.rank], ws[b.rank])
        bias = torch.full((TOKENS[b.rank], H), 0.5)
        one, weights, _ = b.combine(recv_x, handle, bias=bias)
        two, _, _ = b.combine(recv_x, handle, bias=(bias, None))
        three, _, _ = b.combine(recv_x, handle, bias=(bias, bias))
        return one, two, three, weights

    for r, (one, two, three, weights) in enumerate(run_ranks(ranks, flow)):
        assert weights is None
        assert torch.equal(one, sums[r] + 0.5) and torch.equal(two, one) and torch.equal(three, sums[r] + 1.0)


@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
def test_low_latency_fp8_rows_and_scales(ranks, round_scale, use_ue8m0):
    hidden, bmax = 1024, 8
    xs, idx, ws = ref.make_inputs(7, [3, 4, 0, 2], E, hidden, K)
    xs = [x.float().mul(torch.linspace(0.01, 30, hidden)).bfloat16() for x in xs]
    want = ref.ll_dispatch(xs, idx, E, bmax)

    def flow(b):
        recv, count, handle, event, hook = b.low_latency_dispatch(
            xs[b.rank], idx[b.rank], bmax, E, round_scale=round_scale, use_ue8m0=use_ue8m0)
        assert hook is None and event.event is None
        return recv, count

    for r, ((codes, scales), count) in enumerate(run_ranks(ranks, flow)):
        assert codes.dtype == torch.float8_e4m3fn and codes.shape == (E // R, R * bmax, hidden)
        assert count.tolist() == want[r]["counts"]
        blocks = hidden // 512 if use_ue8m0 else hidden // 128
        assert scales.shape == (E // R, R * bmax, blocks) and scales.stride()[1:] == (1, R * bmax)   # column-major
        if use_ue8m0:
            assert scales.dtype == torch.int32
            exponents = scales.contiguous().view(torch.uint8).reshape(E // R, R * bmax, blocks * 4)[..., :hidden // 128]
            exponents = exponents.to(torch.int32)
            per_block = torch.pow(2.0, (exponents - 127).float())
        else:
            assert scales.dtype == torch.float32
            per_block = scales
            if round_scale:
                mantissa, _ = torch.frexp(per_block)
                assert (mantissa[per_block > 0] == 0.5).all()   # powers of two
        decoded = codes.float() * per_block.repeat_interleave(128, dim=2)
        for e, c in enumerate(want[r]["counts"]):
            sent = want[r]["x"][e, :c].float()
            assert torch.all((decoded[e, :c] - sent).abs() <= sent.abs() / 16 + per_block[e, :c].repeat_interleave(128, 1) * 2 ** -9)


def test_intranode_fp8_tuple_passes_rows_and_scales_through(ranks):
    hidden = 256
    xs, idx, ws = ref.make_inputs(8, TOKENS, E, hidden, K, torch.float32)
    codes = [x.div(16).to(torch.float8_e4m3fn) for x in xs]
    scales = [torch.rand(x.shape[0], hidden // 128) for x in xs]
    want_x = ref.ht_dispatch([c.view(torch.uint8) for c in codes], idx, ws, E)
    want_s = ref.ht_dispatch(scales, idx, ws, E)

    def flow(b):
        r = b.rank
        (recv, recv_scales), recv_idx, _, _, handle, _ = layout_and_dispatch(b, (codes[r], scales[r]), idx[r], ws[r])
        # the backward pass: the cached dispatch of bf16 gradients with the FP8 dispatch's handle
        grads = xs[r].bfloat16()
        back = b.dispatch(grads, handle=handle)[0]
        combined, _, _ = b.combine(back, handle)
        return recv, recv_scales, recv_idx, back, combined

    want_back = ref.ht_dispatch([x.bfloat16() for x in xs], idx, ws, E)
    combined = ref.ht_combine(want_back, [w["x"] for w in want_back], TOKENS, torch.bfloat16)
    for r, (recv, recv_scales, recv_idx, back, got) in enumerate(run_ranks(ranks, flow)):
        assert recv.dtype == torch.float8_e4m3fn and torch.equal(recv.view(torch.uint8), want_x[r]["x"])
        assert torch.equal(recv_scales, want_s[r]["x"]) and torch.equal(recv_idx, want_x[r]["idx"])
        assert torch.equal(back, want_back[r]["x"]) and torch.equal(got, combined[r])


@pytest.mark.parametrize("form", ["column_major", "ue8m0_words"])
def test_intranode_fp8_takes_deepgemms_scale_forms(ranks, form):
    """Scales as SGLang's DeepGEMM path makes them: column-major float32 (DeepEP reads any strides),
    or UE8M0 exponent bytes packed 4 to an int32 word ([B, H/512]); moved unchanged."""
    hidden = 512
    xs, idx, ws = ref.make_inputs(18, TOKENS, E, hidden, K, torch.float32)
    codes = [x.div(16).to(torch.float8_e4m3fn) for x in xs]
    g = torch.Generator().manual_seed(18)
    if form == "column_major":
        scales = [torch.rand(hidden // 128, x.shape[0], generator=g).t() for x in xs]   # strides (1, B)
        assert not any(s.is_contiguous() for s in scales if s.shape[0] > 1)
    else:
        scales = [torch.randint(0, 2**31 - 1, (x.shape[0], hidden // 512), generator=g, dtype=torch.int32) for x in xs]
    want_x = ref.ht_dispatch([c.view(torch.uint8) for c in codes], idx, ws, E)
    want_s = ref.ht_dispatch([s.contiguous() for s in scales], idx, ws, E)

    def flow(b):
        (recv, recv_scales), *_ = layout_and_dispatch(b, (codes[b.rank], scales[b.rank]), idx[b.rank], ws[b.rank])
        return recv, recv_scales

    for r, (recv, recv_scales) in enumerate(run_ranks(ranks, flow)):
        assert torch.equal(recv.view(torch.uint8), want_x[r]["x"]) and torch.equal(recv_scales, want_s[r]["x"]), r
    # A scale per token DeepEP would move too; the groups move per-block scales only: named (on
    # every rank: a collective call's check failure takes the rank's round, see on_every_rank).
    for per_token in (torch.ones(TOKENS[0], 1), torch.ones(TOKENS[0])):
        with pytest.raises(NotSupportedError, match=r"x\[1\]=.*shape \[5(, 1)?\].*float32 scales \[B, H/128\]"):
            on_every_rank(ranks, lambda b: layout_and_dispatch(b, (codes[0], per_token), idx[0], ws[0]))


def test_a_padded_ue8m0_dispatch_then_its_backward_pass(ranks):
    """UE8M0 words at a hidden size that is not whole 512s, padded rows (num_worst_tokens), then
    Megatron's backward pass: a cached bf16 dispatch of the gradients (padded too) and its combine."""
    hidden, worst = 640, sum(TOKENS) + 3
    xs, idx, ws = ref.make_inputs(19, TOKENS, E, hidden, K, torch.float32)
    codes = [x.div(16).to(torch.float8_e4m3fn) for x in xs]
    scales = [torch.randint(0, 2**31 - 1, (x.shape[0], 2), generator=torch.Generator().manual_seed(r), dtype=torch.int32)
              for r, x in enumerate(xs)]
    want_s = ref.ht_dispatch(scales, idx, ws, E)
    want_back = ref.ht_dispatch([x.bfloat16() for x in xs], idx, ws, E)
    combined = ref.ht_combine(want_back, [w["x"] for w in want_back], TOKENS, torch.bfloat16)

    def flow(b):
        (recv, recv_scales), _, _, _, handle, _ = layout_and_dispatch(b, (codes[b.rank], scales[b.rank]), idx[b.rank], ws[b.rank],
                                                                     num_worst_tokens=worst)
        back = b.dispatch(xs[b.rank].bfloat16(), handle=handle)[0]
        return recv_scales, back, b.combine(back, handle)[0]

    for r, (recv_scales, back, got) in enumerate(run_ranks(ranks, flow)):
        n = want_s[r]["x"].shape[0]
        assert recv_scales.shape == (worst, 2) and torch.equal(recv_scales[:n], want_s[r]["x"]), r
        assert back.shape == (worst, hidden) and torch.equal(back[:n], want_back[r]["x"]), r
        assert torch.equal(got, combined[r]), r


def rows_and_combined(ranks, flow, rows, combined):
    """`flow(buffer)` -> (rows a dispatch received, combined rows) on every rank, each the
    reference's (`rows[r]["x"]`, `combined[r]`) bit for bit."""
    for r, (got_rows, got) in enumerate(run_ranks(ranks, flow)):
        assert torch.equal(got_rows, rows[r]["x"]), r
        assert torch.equal(got, combined[r]), r


def test_a_cached_dispatch_routes_as_the_dispatch_did_whatever_the_caller_writes_after(ranks):
    """DeepEP's handle routes a cached dispatch by the layout its dispatch made: a caller that
    reuses its topk_idx / topk_weights in place after the forward pass changes nothing. Here a
    cached dispatch into another format (FP8 forward, bf16 backward) started its step from the
    caller's tensors as they were then, and received other tokens, silently."""
    xs, idx, ws = ref.make_inputs(23, TOKENS, E, 128, K, torch.float32)
    codes = [x.div(16).to(torch.float8_e4m3fn) for x in xs]
    scales = [torch.ones(x.shape[0], 1) for x in xs]
    back_in = [x.bfloat16() for x in xs]
    want = ref.ht_dispatch(back_in, idx, ws, E)
    combined = ref.ht_combine(want, [w["x"] for w in want], TOKENS, torch.bfloat16)

    def flow(b):
        given_idx, given_w = idx[b.rank].clone(), ws[b.rank].clone()
        handle = layout_and_dispatch(b, (codes[b.rank], scales[b.rank]), given_idx, given_w)[4]
        given_idx.copy_((given_idx + 1) % E)   # (reused in place: another routing)
        given_w.zero_()
        back = b.dispatch(back_in[b.rank], handle=handle)[0]
        return back, b.combine(back, handle)[0]

    rows_and_combined(ranks, flow, want, combined)


def test_combine_after_a_cached_dispatch_of_side_data(ranks):
    """A cached dispatch of other rows (side data of another hidden size, or another dtype) between
    a dispatch and its combine: DeepEP's combine takes the rows as its dispatch moved them; here it
    took only the latest dispatch's hidden size and dtype."""
    xs, idx, ws = ref.make_inputs(29, TOKENS, E, H, K, torch.bfloat16)
    want = ref.ht_dispatch(xs, idx, ws, E)
    combined = ref.ht_combine(want, [w["x"] for w in want], TOKENS, torch.bfloat16)
    sides = [torch.arange(b * 8, dtype=torch.float32).reshape(b, 8) for b in TOKENS]
    want_side = ref.ht_dispatch(sides, idx, ws, E)

    def flow(b):
        recv_x, _, _, _, handle, _ = layout_and_dispatch(b, xs[b.rank], idx[b.rank], ws[b.rank])
        side = b.dispatch(sides[b.rank], handle=handle)[0]
        return side, b.combine(recv_x, handle)[0]

    rows_and_combined(ranks, flow, want_side, combined)


def test_events_and_hooks_on_the_cpu(ranks):
    xs, idx, ws = ref.make_inputs(9, TOKENS, E, H, K)
    captured = Buffer.capture()
    assert isinstance(captured, EventOverlap)

    def flow(b):
        r = b.rank
        _, _, _, _, event = b.get_dispatch_layout(idx[r], E, previous_event=captured, async_finish=True)
        with event:   # the body overlaps the call; leaving waits
            pass
        recv, count, handle, event, hook = b.low_latency_dispatch(xs[r], idx[r], 12, E, use_fp8=False, return_recv_hook=True)
        hook()
        hook()   # a second call does nothing more
        return event.event, count.tolist()

    want = ref.ll_dispatch(xs, idx, E, 12)
    for r, (event, count) in enumerate(run_ranks(ranks, flow)):
        assert event is None and count == want[r]["counts"]


def test_low_latency_buffers_are_reused_two_dispatches_later(ranks):
    xs, idx, ws = ref.make_inputs(10, TOKENS, E, H, K)

    def flow(b):
        r = b.rank
        views = [b.low_latency_dispatch(xs[r], idx[r], 12, E, use_fp8=False)[0] for _ in range(3)]
        return views[0].data_ptr() == views[2].data_ptr(), views[0].data_ptr() != views[1].data_ptr()

    assert all(a and b for a, b in run_ranks(ranks, flow))


def test_handles_give_their_steps_back_for_reuse(ranks):
    xs, idx, ws = ref.make_inputs(11, TOKENS, E, H, K)
    run_ranks(ranks, lambda b: b.low_latency_dispatch(xs[b.rank], idx[b.rank], 12, E, use_fp8=False)[2] and None)
    gc.collect()
    entries = [e for e in ranks[0]._shared.groups._all if e.spec.algorithm == "ll"]
    free = sum(len(e._free) for e in entries)
    assert free >= 1
    run_ranks(ranks, lambda b: b.low_latency_dispatch(xs[b.rank], idx[b.rank], 12, E, use_fp8=False) and None)
    gc.collect()
    assert sum(len(e._free) for e in entries) == free   # the step came from the pool and went back


def test_static_settings():
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == 2 * (32 * 8 * 128 * 7168 * 2 + 128 * 7168 * 2)
    config = Buffer.get_dispatch_config(8)
    assert isinstance(config, Config) and config.num_sms == Buffer.num_sms
    assert Buffer.get_combine_config(8).get_nvl_buffer_size_hint(7168 * 2, 8) == 0
    with pytest.raises(ep.InvalidArgumentError, match="new_num_sms=21; must be an even integer"):
        Buffer.set_num_sms(21)
    with pytest.raises(ep.InvalidArgumentError, match="num_sms=0"):
        Config(0)
    assert topk_idx_t is torch.int64


def test_unsupported_arguments_raise_named_errors(ranks):
    b = ranks[0]
    x, i = torch.zeros(2, H, dtype=torch.bfloat16), torch.zeros(2, K, dtype=torch.int64)
    with pytest.raises(NotSupportedError, match="num_tokens_per_rdma_rank"):
        on_every_rank(ranks, lambda b: b.dispatch(x, num_tokens_per_rdma_rank=torch.zeros(1, dtype=torch.int32), topk_idx=i))
    with pytest.raises(NotSupportedError, match="dispatch_wait_recv_cost_stats"):
        on_every_rank(ranks, lambda b: b.low_latency_dispatch(
            x, i, 4, E, dispatch_wait_recv_cost_stats=torch.zeros(R, R, dtype=torch.int64)))
    with pytest.raises(NotSupportedError, match="use_logfmt=True"):
        on_every_rank(ranks, lambda b: b.low_latency_combine(torch.zeros(4, R * 4, H), i, torch.ones(2, K), None, use_logfmt=True))
    with pytest.raises(NotSupportedError, match="internode"):
        b.internode_dispatch(x)
    with pytest.raises(NotImplementedError):
        b.get_local_buffer_tensor(torch.bfloat16)
    with pytest.raises(ep.InvalidArgumentError, match="use_ue8m0=True with round_scale=False"):
        on_every_rank(ranks, lambda b: b.low_latency_dispatch(x, i, 4, E, use_ue8m0=True))
    with pytest.raises(ep.InvalidArgumentError, match=r"x: 2 tokens; must be ≤ num_max_dispatch_tokens_per_rank \(1\)"):
        on_every_rank(ranks, lambda b: b.low_latency_dispatch(x, i, 1, E))
    with pytest.raises(ep.InvalidArgumentError, match=r"num_experts=6; must be a multiple of the number of ranks \(4\)"):
        b.get_dispatch_layout(i, 6)
    with pytest.raises(ep.InvalidArgumentError, match=r"is_token_in_rank: shape \[2, 3\]; must be \[2, 4\]"):
        on_every_rank(ranks, lambda b: b.dispatch(
            x, num_tokens_per_rank=torch.zeros(R, dtype=torch.int32), is_token_in_rank=torch.zeros(2, 3, dtype=torch.bool),
            num_tokens_per_expert=torch.zeros(E, dtype=torch.int32), topk_idx=i))


def test_arguments_of_the_wrong_kind_are_named(ranks):
    # Found by a random-arguments probe: each raised a bare TypeError, ValueError, AttributeError or
    # (ids past the experts) an index error inside the layout's computation.
    import numpy as np

    b = ranks[0]
    x, i = torch.zeros(2, H, dtype=torch.bfloat16), torch.zeros(2, K, dtype=torch.int64)
    with pytest.raises(ep.InvalidArgumentError, match=r"^async_finish=array\(\[1, 2\]\) \(type ndarray\); must be a bool"):
        b.get_dispatch_layout(i, E, async_finish=np.array([1, 2]))
    with pytest.raises(ep.InvalidArgumentError, match=r"^use_fp8='yes' \(type str\); must be a bool"):
        on_every_rank(ranks, lambda b: b.low_latency_dispatch(x, i, 4, E, use_fp8="yes"))
    with pytest.raises(ep.InvalidArgumentError, match=r"^num_experts: a Tensor that is not one integer; must be an integer"):
        b.get_dispatch_layout(i, torch.tensor([E, E]))
    with pytest.raises(ep.InvalidArgumentError, match=r"^num_tokens_per_rank: a int; must be a torch.Tensor"):
        on_every_rank(ranks, lambda b: b.dispatch(x, num_tokens_per_rank=3, is_token_in_rank=torch.zeros(2, R, dtype=torch.bool),
                                                  num_tokens_per_expert=torch.zeros(E, dtype=torch.int32), topk_idx=i))
    with pytest.raises(ep.InvalidArgumentError, match=r"^num_tokens_per_expert: a list; must be a torch.Tensor"):
        on_every_rank(ranks, lambda b: b.dispatch(
            x, num_tokens_per_rank=torch.zeros(R, dtype=torch.int32), is_token_in_rank=torch.zeros(2, R, dtype=torch.bool),
            num_tokens_per_expert=[E], topk_idx=i))
    # Not contiguous: named as DeepEP names the argument (the library named its own per-rank list, xs[0]).
    wide = torch.zeros(2, 2 * H, dtype=torch.bfloat16)
    with pytest.raises(ep.InvalidArgumentError, match=r"^x: not contiguous \(strides \(" + str(2 * H) + r", 2\)\)"):
        on_every_rank(ranks, lambda b: b.low_latency_dispatch(wide[:, ::2], i, 4, E))
    # FP8 (DeepEP's default) with a hidden size off its 128-element scale block: named as the caller
    # wrote it (it was the group config's "epGroupCreate: ... hidden = 64; ... FP8 scale mode 'float32'").
    with pytest.raises(ep.InvalidArgumentError, match=r"^x: hidden size 64 with use_fp8=True .*multiple of 128"):
        on_every_rank(ranks, lambda b: b.low_latency_dispatch(torch.zeros(2, 64, dtype=torch.bfloat16), i, 4, E))
    with pytest.raises(ep.InvalidArgumentError, match=r"^topk_idx: not contiguous"):
        b.get_dispatch_layout(torch.zeros(K, 2, dtype=torch.int64).t(), E)
    # A negative view (its memory holds its values negated) and a shrunk storage: named by DeepEP's
    # names too (the library named its own per-rank list, xs[0]).
    with pytest.raises(ep.InvalidArgumentError, match=r"^x: a negative view \(is_neg\(\) is True\)"):
        on_every_rank(ranks, lambda b: b.low_latency_dispatch(torch._neg_view(x), i, 4, E))
    shrunk = torch.zeros(2, H, dtype=torch.bfloat16)
    shrunk.untyped_storage().resize_(8)
    with pytest.raises(ep.InvalidArgumentError, match=r"^x: storage of 8 bytes; must hold the " + str(4 * H) + " bytes"):
        on_every_rank(ranks, lambda b: b.low_latency_dispatch(shrunk, i, 4, E))
    # Ids outside [0, E) count nowhere in the layout (the dispatch that follows names them).
    per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(torch.tensor([[0, E + 5, 1], [-1, 2, E]]), E)
    assert per_expert.tolist() == [1, 1, 1] + [0] * (E - 3) and per_rank.tolist() == [2, 0, 0, 0]


def test_ranks_that_disagree_or_stay_away_fail_every_rank_by_name():
    buffers = Buffer.virtual(2, timeout=0.5, low_latency_mode=True)
    x, i = torch.zeros(1, H, dtype=torch.bfloat16), torch.zeros(1, K, dtype=torch.int64)
    i[0] = torch.tensor([0, 1, 2])

    def mismatched(b):
        if b.rank == 0:
            return b.low_latency_dispatch(x, i, 2, 4, use_fp8=False)
        return b.get_dispatch_layout(i, 4) and b.low_latency_dispatch(x, i, 3, 4, use_fp8=False)

    with pytest.raises(ep.InvalidArgumentError, match="num_max_dispatch_tokens_per_rank: 3 on rank 1 but 2 on rank 0"):
        run_ranks(buffers, mismatched, timeout=10)
    with pytest.raises(ep.RankTimeoutError, match=r"virtual ranks \[1\] did not make call 1"):
        run_ranks(buffers, lambda b: b.low_latency_dispatch(x, i, 2, 4, use_fp8=False) if b.rank == 0 else None, timeout=10)
    # rank 1 comes late to call 1: it gets the same error, and the ranks are in step again after it
    with pytest.raises(ep.RankTimeoutError):
        buffers[1].low_latency_dispatch(x, i, 2, 4, use_fp8=False)
    results = run_ranks(buffers, lambda b: b.low_latency_dispatch(x, i, 2, 4, use_fp8=False)[1].tolist(), timeout=10)
    assert results == [[2, 2], [2, 0]]   # both ranks' token reaches experts 0, 1 (rank 0) and 2 (rank 1)


# -- a rank whose collective call fails its own checks (virtual ranks) ------------------------
# Found by a user probe: the failing rank raised without taking its round, so its peers waited out
# the timeout (RankTimeoutError blaming it), every later call timed out too (the ranks' call counts
# differed by one) and run_ranks raised rank 0's timeout instead of rank 1's error.

E2, TOKENS2 = 8, [5, 4]   # 2 ranks; rank 1 has 4 tokens


def outcomes(buffers, function):
    """Each rank's result of `function(buffer)` (or the exception it raised), and the seconds all took."""
    def caught(b):
        try:
            return function(b)
        except Exception as error:
            return error

    start = time.monotonic()
    got = run_ranks(buffers, caught, timeout=120)
    return got, time.monotonic() - start


def ll_dispatch_and_combine(xs, idx, ws):
    """A good low-latency dispatch and combine: each rank's received rows per local expert, counts and combined rows."""
    def flow(b):
        r = b.rank
        recv_x, count, handle, _, _ = b.low_latency_dispatch(xs[r], idx[r], 8, E2, use_fp8=False)
        combined = b.low_latency_combine(ref.ll_expert_function(recv_x, r, E2 // 2), idx[r], ws[r], handle)[0]
        return [recv_x[e, :c].clone() for e, c in enumerate(count.tolist())], count.tolist(), combined.clone()

    return flow


def assert_same(got, want):
    for r, ((rows, count, combined), (w_rows, w_count, w_combined)) in enumerate(zip(got, want)):
        assert count == w_count and len(rows) == len(w_rows) and all(torch.equal(a, b) for a, b in zip(rows, w_rows)), r
        assert torch.equal(combined, w_combined), r


def peer_error_of(error, call, message):
    assert isinstance(error, ep.PeerFailedError) and isinstance(error, ep.ExpertParallelError), repr(error)
    assert str(error).startswith(f"virtual rank 1's call {call} failed before it began, so no rank's call ran: "), str(error)
    assert str(error).endswith(f"InvalidArgumentError: {message}"), str(error)


@pytest.mark.parametrize("late", [None, "failing rank", "peer"])
def test_a_rank_whose_call_fails_its_checks_fails_the_round_on_every_rank_at_once(late):
    """Rank 1's count is too small for its tokens: it raises its own error, rank 0 a PeerFailedError
    naming it, at once (whichever comes first); the ranks stay in step, the next calls work."""
    buffers = Buffer.virtual(2, timeout=30)
    fresh = Buffer.virtual(2, timeout=30)
    xs, idx, ws = ref.make_inputs(31, TOKENS2, E2, H, K)
    message = "x: 4 tokens; must be ≤ num_max_dispatch_tokens_per_rank (2)"

    def bad(b):
        if late == ("failing rank" if b.rank == 1 else "peer"):
            time.sleep(0.3)   # (the other rank is in the round first)
        return b.low_latency_dispatch(xs[b.rank], idx[b.rank], 8 if b.rank == 0 else 2, E2, use_fp8=False)

    (peer, own), took = outcomes(buffers, bad)
    assert took < 5, f"the failing round took {took:.1f} s"
    assert type(own) is ep.InvalidArgumentError and str(own) == message
    peer_error_of(peer, "0 (low_latency_dispatch)", message)
    # In step again: the same good calls give what they give on fresh buffers (and the reference's).
    flow = ll_dispatch_and_combine(xs, idx, ws)
    got, want = run_ranks(buffers, flow, timeout=10), run_ranks(fresh, flow, timeout=10)
    assert_same(got, want)
    for r, (_, _, combined) in enumerate(got):
        assert torch.equal(combined, ref.ll_combine(xs, idx, ws, E2, xs[0].dtype)[r]), r
    assert_same(run_ranks(buffers, flow, timeout=10), want)
    for b in buffers + fresh:
        b.destroy()


def intranode_flow(xs, idx, ws, bad_weights=None):
    """Dispatch, the experts, then (`bad_weights`: rank 1's combine with those first, caught) a good
    combine: each rank's (error of the bad combine, its seconds), combined rows and weights."""
    def flow(b):
        r = b.rank
        per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(idx[r], E2)
        recv_x, _, recv_w, _, handle, _ = b.dispatch(xs[r], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                     num_tokens_per_expert=per_expert, topk_idx=idx[r], topk_weights=ws[r])
        y = ref.expert_function(recv_x, r)
        failed = None
        if bad_weights is not None:
            start = time.monotonic()
            try:
                b.combine(y, handle, topk_weights=bad_weights(recv_w) if r == 1 else recv_w)
            except Exception as error:
                failed = error, time.monotonic() - start
        combined, combined_w, _ = b.combine(y, handle, topk_weights=recv_w)
        return failed, [recv_x.clone()], combined.clone(), combined_w.clone()

    return flow


def low_latency_flow(xs, idx, ws, bad_weights=None, hook=False):
    """The low-latency counterpart of intranode_flow (`hook`: send-only calls and async events)."""
    def flow(b):
        r = b.rank
        recv_x, count, handle, event, receive = b.low_latency_dispatch(
            xs[r], idx[r], 8, E2, use_fp8=False, async_finish=hook, return_recv_hook=hook)
        if hook:
            receive()
        event.current_stream_wait()
        y = ref.ll_expert_function(recv_x, r, E2 // 2)
        failed = None
        if bad_weights is not None:
            start = time.monotonic()
            try:
                b.low_latency_combine(y, idx[r], bad_weights(ws[r]) if r == 1 else ws[r], handle, async_finish=hook,
                                      return_recv_hook=hook)
            except Exception as error:
                failed = error, time.monotonic() - start
        combined, event, receive = b.low_latency_combine(y, idx[r], ws[r], handle, async_finish=hook, return_recv_hook=hook)
        if hook:
            receive()
        event.current_stream_wait()
        return failed, [recv_x[e, :c].clone() for e, c in enumerate(count.tolist())], combined.clone(), None

    return flow


@pytest.mark.parametrize("path", ["intranode", "low_latency", "low_latency_hook", "low_latency_int"])
def test_a_rank_whose_combine_gets_bad_topk_weights_fails_the_round_on_every_rank_at_once(path):
    """Rank 1's topk_weights are float64 (combine), a list or int64 (low_latency_combine): rank 1 raises
    its own error, rank 0 a PeerFailedError naming it, at once; the good combine that follows on
    the same handle gives what it gives on fresh buffers."""
    buffers = Buffer.virtual(2, timeout=30)
    fresh = Buffer.virtual(2, timeout=30)
    xs, idx, ws = ref.make_inputs(32, TOKENS2, E2, H, K)
    if path == "intranode":
        bad, name, message = (lambda w: w.double()), "combine", "topk_weights: dtype torch.float64; must be torch.float32"
        flow, good = intranode_flow(xs, idx, ws, bad), intranode_flow(xs, idx, ws)
    elif path == "low_latency_int":
        bad, name = (lambda w: (w * 100).long()), "low_latency_combine"
        message = "topk_weights: dtype torch.int64; must be torch.float32 (another floating dtype is converted)"
        flow, good = low_latency_flow(xs, idx, ws, bad), low_latency_flow(xs, idx, ws)
    else:
        bad, name, message = (lambda w: w.tolist()), "low_latency_combine", "topk_weights: a list; must be a torch.Tensor"
        flow, good = low_latency_flow(xs, idx, ws, bad, hook=path.endswith("hook")), low_latency_flow(xs, idx, ws)
    got = run_ranks(buffers, flow, timeout=120)
    (peer, peer_took), (own, own_took) = got[0][0], got[1][0]
    assert peer_took < 5 and own_took < 5, (peer_took, own_took)
    assert type(own) is ep.InvalidArgumentError and str(own) == message
    peer_error_of(peer, f"1 ({name})", message)   # (its second collective call: get_dispatch_layout is local)
    want = run_ranks(fresh, good, timeout=10)

    def assert_as_fresh(results):
        for r, ((_, rows, combined, weights), (_, w_rows, w_combined, w_weights)) in enumerate(zip(results, want)):
            assert len(rows) == len(w_rows) and all(torch.equal(a, b) for a, b in zip(rows, w_rows)), r
            assert torch.equal(combined, w_combined), r
            assert (weights is None and w_weights is None) or torch.equal(weights, w_weights), r

    assert_as_fresh(got)
    if path != "intranode":
        for r, (_, _, combined, _) in enumerate(got):
            assert torch.equal(combined, ref.ll_combine(xs, idx, ws, E2, xs[0].dtype)[r]), r
    assert_as_fresh(run_ranks(buffers, good, timeout=10))   # (and the calls after)
    for b in buffers + fresh:
        b.destroy()


def test_run_ranks_raises_the_root_cause():
    """The failing rank's own error, not rank 0's PeerFailedError (or a timeout) reporting it."""
    buffers = Buffer.virtual(2, timeout=30)
    xs, idx, ws = ref.make_inputs(33, TOKENS2, E2, H, K)
    start = time.monotonic()
    with pytest.raises(ep.InvalidArgumentError, match=r"^x: 4 tokens; must be ≤ num_max_dispatch_tokens_per_rank \(2\)$"):
        run_ranks(buffers, lambda b: b.low_latency_dispatch(xs[b.rank], idx[b.rank], 8 if b.rank == 0 else 2, E2, use_fp8=False))
    assert time.monotonic() - start < 5
    run_ranks(buffers, ll_dispatch_and_combine(xs, idx, ws), timeout=10)
    for b in buffers:
        b.destroy()

    def raising(errors):
        def function(rank):
            if errors[rank] is not None:
                raise errors[rank]
            return rank
        return function

    timeout, peer, own, other = ep.RankTimeoutError("t"), ep.PeerFailedError("p"), ValueError("v"), KeyError("k")
    assert run_ranks([0, 1, 2], raising([None, None, None])) == [0, 1, 2]
    for errors, want in [([timeout, peer, own, other], own), ([peer, other, own], other), ([peer, timeout], peer),
                         ([None, timeout, peer], timeout)]:
        with pytest.raises(type(want)) as raised:
            run_ranks(list(range(len(errors))), raising(errors))
        assert raised.value is want


def test_install_as_deep_ep_makes_import_deep_ep_give_the_adapter(monkeypatch, tmp_path):
    import importlib
    import importlib.util
    import sys

    from expert_parallel.compat import deep_ep as adapter

    monkeypatch.delitem(sys.modules, "deep_ep", raising=False)
    monkeypatch.setitem(sys.modules, "deep_ep.utils", adapter.utils)   # (gone again after the test)
    monkeypatch.setitem(sys.modules, "deep_ep.buffer", adapter._buffer_module)
    monkeypatch.syspath_prepend(str(tmp_path))   # (no DeepEP on this path)
    assert adapter.install_as_deep_ep() is adapter
    import deep_ep

    assert deep_ep is adapter and deep_ep.Buffer is Buffer and importlib.util.find_spec("deep_ep") is not None
    from deep_ep.utils import EventHandle, EventOverlap as Overlap   # as Megatron imports them

    assert Overlap is EventOverlap and sys.modules["deep_ep.utils"] is adapter.utils
    from deep_ep.buffer import Buffer as Imported   # as code that names the module imports it
    import deep_ep.buffer

    assert Imported is Buffer and deep_ep.buffer.Buffer is Buffer and Buffer.is_sm90_compiled() is True
    Overlap(EventHandle()).current_stream_wait()   # no CUDA here: nothing to wait for
    assert adapter.install_as_deep_ep() is adapter   # again: nothing to do
    # DeepEP itself, imported or installed, is kept unless replace=True.
    real = type(sys)("deep_ep")
    real.__file__ = "/site-packages/deep_ep/__init__.py"
    monkeypatch.setitem(sys.modules, "deep_ep", real)
    with pytest.raises(ep.InvalidUsageError, match="deep_ep: already imported .*/site-packages/deep_ep/__init__.py"):
        adapter.install_as_deep_ep()
    assert adapter.install_as_deep_ep(replace=True) is adapter and sys.modules["deep_ep"] is adapter
    monkeypatch.delitem(sys.modules, "deep_ep")
    (tmp_path / "deep_ep").mkdir()
    (tmp_path / "deep_ep" / "__init__.py").write_text("")
    importlib.invalidate_caches()
    with pytest.raises(ep.InvalidUsageError, match=r"deep_ep: DeepEP is installed \(.*deep_ep/__init__.py'\); pass replace=True"):
        adapter.install_as_deep_ep()
    assert "deep_ep" not in sys.modules


def test_low_latency_calls_under_inference_mode(ranks):
    # Serving engines run the model under torch.inference_mode: tensors made there keep no version
    # counter (the combine then masks -1 entries itself, as for another routing tensor).
    xs, idx, ws = ref.make_inputs(8, TOKENS, E, H, K)
    local = E // R

    def rank_flow(b):
        r = b.rank
        with torch.inference_mode():
            x, i, w = xs[r].clone(), idx[r].clone(), ws[r].clone()
            recv_x, _, handle, _, _ = b.low_latency_dispatch(x, i, 12, E, use_fp8=False)
            return b.low_latency_combine(ref.ll_expert_function(recv_x, r, local), i, w, handle)[0].clone()

    results = run_ranks(ranks, rank_flow, timeout=30)
    want = ref.ll_combine(xs, idx, ws, E, xs[0].dtype)
    assert all(torch.equal(got, want[r]) for r, got in enumerate(results))


@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
def test_low_latency_fp8_scales_behind_a_hook_are_the_whole_calls(ranks, round_scale, use_ue8m0):
    # A split dispatch's scales are filled at the hook's call: after a send-only dispatch at R > 1
    # the peers' scales arrive with their rows, when the receiving half has run.
    hidden, bmax = 1024, 8
    xs, idx, _ = ref.make_inputs(17, [3, 4, 0, 2], E, hidden, K)
    xs = [x.float().mul(torch.linspace(0.01, 30, hidden)).bfloat16() for x in xs]

    def flow(hook):
        def run(b):
            (codes, scales), count, _, _, receive = b.low_latency_dispatch(
                xs[b.rank], idx[b.rank], bmax, E, round_scale=round_scale, use_ue8m0=use_ue8m0, return_recv_hook=hook)
            if hook:
                receive()
            return codes.view(torch.uint8).clone(), scales.clone(memory_format=torch.preserve_format), count.clone()
        return run

    for r, (split, whole) in enumerate(zip(run_ranks(ranks, flow(True)), run_ranks(ranks, flow(False)))):
        assert torch.equal(split[2], whole[2]), f"rank {r}: counts"
        assert split[1].stride() == whole[1].stride() and split[1].stride()[1] == 1, f"rank {r}: column-major scales"
        for e, c in enumerate(whole[2].tolist()):   # rows past the counts are unspecified
            assert torch.equal(split[0][e, :c], whole[0][e, :c]) and torch.equal(split[1][e, :c], whole[1][e, :c]), f"rank {r} expert {e}"


@pytest.mark.parametrize("fp8,ue8m0", [("float32", False), ("ue8m0", False), ("ue8m0", True)])
def test_low_latency_scales_are_read_when_filled(fp8, ue8m0):
    from expert_parallel.compat.deep_ep._engine import _ll_scales

    hidden, blocks = 1024, 8
    words = torch.zeros((2, 6, 2 if fp8 == "ue8m0" else blocks), dtype=torch.float32 if fp8 == "float32" else torch.int32)
    target, fill = _ll_scales(words, fp8, ue8m0, hidden)
    expected_blocks = 2 if ue8m0 else blocks
    assert target.shape == (2, 6, expected_blocks) and target.stride()[1:] == (1, 6)   # DeepEP's column-major
    if fp8 == "float32":
        words.copy_(torch.arange(words.numel(), dtype=torch.float32).reshape(words.shape))
    else:
        words.view(torch.uint8).copy_(torch.arange(words.numel() * 4).reshape(2, 6, 8) % 5 + 125)
    fill()   # reads the words as they are now
    if fp8 == "float32" or ue8m0:
        assert torch.equal(target, words[..., :expected_blocks])
    else:
        assert torch.equal(target, torch.pow(2.0, (words.view(torch.uint8)[..., :blocks].float() - 127)))


def test_destroying_the_buffers_releases_the_steps_kept_for_reuse():
    # A group's library object lives until its last step goes, and an NCCL group's teardown is
    # collective: the steps kept for reuse go when the groups close, not at garbage collection,
    # and a step that DeepEP handles hold past the destroy goes when they do.
    buffers = Buffer.virtual(2, timeout=30)
    xs, idx, _ = ref.make_inputs(12, [3, 2], 8, H, K)
    held = run_ranks(buffers, lambda b: b.low_latency_dispatch(xs[b.rank], idx[b.rank], 4, 8, use_fp8=False)[2])
    record = held[0].record
    step = record.step_in(record.last)
    del record
    run_ranks(buffers, lambda b: b.low_latency_dispatch(xs[b.rank], idx[b.rank], 4, 8, use_fp8=False)[2] and None)
    gc.collect()
    kept = [s for e in buffers[0]._shared.groups._all for s in e._free]
    assert kept and step not in kept and not any(s.released for s in kept + [step])
    for b in buffers:
        b.destroy()
    assert all(s.released for s in kept) and not step.released
    del held
    gc.collect()
    assert step.released


def test_ranks_disagreeing_on_a_group_are_named_alike_on_every_rank():
    from expert_parallel.compat.deep_ep._groups import Spec, disagreement

    spec = Spec("ht", 16, 128, 4, "bf16", None, "quantize", None)
    same = [(tuple(spec), 4096, None)] * 3
    assert disagreement(same) is None
    other = [same[0], (tuple(spec._replace(experts=32)), 4096, None), (tuple(spec._replace(hidden=256)), 4096, None)]
    message = disagreement(other)
    assert message.startswith("the ranks ask for different groups (experts 16 on rank 0, 32 on rank 1)")
    assert disagreement([same[0], (tuple(spec), 4096, "x: 5000 tokens on a rank; must be ≤ 4096")]) == \
        "rank 1: x: 5000 tokens on a rank; must be ≤ 4096"
    assert "max_tokens 4096 on rank 0, 8192 on rank 1" in disagreement([same[0], (tuple(spec), 8192, None)])


def _on_two_ranks(worker, tmp_path):
    """`worker(rank, store, results)` in two processes; their shared results as a dict."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
        return dict(results)


def _agree_on_two_ranks(rank, store, results):
    import torch.distributed as dist
    from expert_parallel.compat.deep_ep._groups import Groups, Spec

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        # The NCCL mode's agreement over a (gloo) process group: rank 1 asks for more tokens than the capacity.
        groups = Groups(ranks=2, device="cuda:0", timeout=10, process_group=dist.group.WORLD, fixed_tokens=64)
        spec = Spec("ht", 8, 64, 2, "bf16", None, "quantize", None)
        try:
            groups.entry(spec, 32 if rank == 0 else 100)
            results[rank] = "no error"
        except ep.InvalidArgumentError as error:
            results[rank] = str(error)
    finally:
        dist.destroy_process_group()


def test_a_rank_that_cannot_make_an_nccl_group_fails_every_rank_by_name(tmp_path):
    # (The group itself is never made: every rank raises at the agreement, before the NCCL group.)
    results = _on_two_ranks(_agree_on_two_ranks, tmp_path)
    assert results[0] == results[1] and results[0].startswith("rank 1: x: 100 tokens on a rank; must be ≤ max_tokens_per_rank (64)")


def _one_rank_never_comes(rank, store, results):
    import time

    import torch
    import torch.distributed as dist
    from expert_parallel.compat.deep_ep import _agreement
    from expert_parallel.compat.deep_ep._groups import Groups, Spec

    _agreement.MINIMUM_SECONDS = 0   # (the test's 1.5 s bound rather than the least of a real run)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        if rank == 0:
            groups = Groups(ranks=2, device="cuda:0", timeout=1.5, process_group=dist.group.WORLD, fixed_tokens=64)
            spec = Spec("ht", 8, 64, 2, "bf16", None, "quantize", None)
            start = time.monotonic()
            try:
                groups.entry(spec, 32)
                results[0] = "no error"
            except ep.RankTimeoutError as error:
                results[0] = str(error)
            results["seconds"] = time.monotonic() - start
            try:   # the pending collective makes the process group unusable: later agreements are refused by name
                groups.entry(spec._replace(hidden=128), 32)
            except ep.InvalidUsageError as error:
                results["again"] = str(error)
        else:
            # Rank 1's call failed its own checks before the agreement: it never comes. Once rank 0
            # has its error, it posts the pending all-gather's other half so both can tear down.
            while 0 not in results:
                time.sleep(0.05)
            dist.all_gather([torch.zeros(1, dtype=torch.int64) for _ in range(2)], torch.zeros(1, dtype=torch.int64))
    finally:
        dist.destroy_process_group()


def test_a_rank_whose_peer_never_comes_to_the_agreement_times_out_by_name(tmp_path):
    # The peers of a rank whose first call of a shape failed its own checks waited in the agreement
    # until the process group's timeout (minutes): now the Buffer's timeout bounds it.
    results = _on_two_ranks(_one_rank_never_comes, tmp_path)
    assert results[0].startswith("the ranks' agreement on a new group (a call's first of its shape): a peer rank did "
                                 "not come within timeout=1.5 s")
    assert 1.5 <= results["seconds"] < 10
    assert results["again"].startswith("this Buffer's process group has a collective left pending since an agreement timed out")


def _construct_on_two_ranks(rank, store, results):
    from unittest import mock

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        collectives = []
        real = dist.all_reduce
        with mock.patch.object(dist, "all_reduce", lambda *a, **k: (collectives.append(1), real(*a, **k))[1]):
            Buffer(dist.group.WORLD, device="cuda:0")   # (groups are made lazily: no GPU is needed here)
        results[rank] = len(collectives)
    finally:
        dist.destroy_process_group()


def test_a_multi_process_buffer_sets_up_its_process_group_when_constructed(tmp_path):
    # An NCCL group sets up its communicator in its first collective, inside the call, where the
    # agreements' deadline cannot bound it: the construction (every rank there) makes that one.
    assert _on_two_ranks(_construct_on_two_ranks, tmp_path) == {0: 1, 1: 1}


def test_a_hooked_fp8_dispatch_fills_its_scales_at_the_hook(monkeypatch):
    # The scales' fill waits for the hook (at R > 1 NCCL ranks the peers' scales arrive by then).
    from expert_parallel.compat.deep_ep import _engine

    log = []
    made = _engine._ll_scales

    def logged(*arguments):
        target, fill = made(*arguments)
        log.append("made")
        return target, lambda: (log.append("filled"), fill())

    monkeypatch.setattr(_engine, "_ll_scales", logged)
    buffer = Buffer.virtual(1, timeout=30)[0]
    xs, idx, _ = ref.make_inputs(13, [4], 8, 256, K)
    *_, receive = buffer.low_latency_dispatch(xs[0], idx[0], 4, 8, return_recv_hook=True)
    assert log == ["made"]
    receive()
    assert log == ["made", "filled"]
    buffer.low_latency_dispatch(xs[0], idx[0], 4, 8)   # whole: filled at once
    assert log == ["made", "filled", "made", "filled"]
    buffer.destroy()


def test_inputs_that_require_grad_are_moved_as_their_values(ranks):
    """DeepEP's calls read their tensors' memory and return tensors without a graph, whatever the
    inputs' requires_grad (Megatron-style code wraps them in an autograd.Function of its own; a
    plain loop may pass the experts' outputs as they are). The intranode combine copied x into
    the group's staging buffer in place, under the caller's grad mode: an x that required grad
    raised torch's RuntimeError ("A view was created in no_grad mode and is being modified
    inplace with grad mode enabled")."""
    xs, idx, ws = ref.make_inputs(9, TOKENS, E, H, K, torch.float32)
    scale = torch.full((H,), 2.0, requires_grad=True)

    def rank_flow(b):
        r = b.rank
        x, w = xs[r].clone().requires_grad_(), ws[r].clone().requires_grad_()
        recv_x, _, recv_w, _, handle, _ = layout_and_dispatch(b, x, idx[r], w)
        y, y_w = recv_x * scale, recv_w.clone().requires_grad_()    # the experts' outputs, in the graph
        combined, combined_w, _ = b.combine(y, handle, topk_weights=y_w)
        again = b.dispatch(combined, handle=handle)[0]              # a cached dispatch of a tensor in the graph
        with torch.no_grad():
            plain, plain_w, _ = b.combine(y.detach(), handle, topk_weights=y_w.detach())
            plain_again = b.dispatch(plain, handle=handle)[0]
        results = (recv_x, recv_w, combined, combined_w, again)
        return [t.requires_grad for t in results], (combined, combined_w, again), (plain, plain_w, plain_again)

    for r, (grads, got, want) in enumerate(run_ranks(ranks, rank_flow, timeout=30)):
        assert not any(grads), r
        assert all(torch.equal(a, b) for a, b in zip(got, want)), r



def test_calls_after_a_first_call_under_inference_mode():
    """A Buffer's groups and their buffers are made by its first call of a shape; made under
    torch.inference_mode (a serving engine's warm-up), they were inference tensors, which a later
    call outside inference mode (an RL trainer's update between rollouts, a no_grad evaluation)
    cannot update in place: torch's RuntimeError ("Inplace update to inference tensor outside
    InferenceMode"). They are made as normal tensors, which calls in either mode may update."""
    xs, idx, ws = ref.make_inputs(10, TOKENS, E, H, K)
    want = ref.ht_dispatch(xs, idx, ws, E)
    local = E // R

    def rank_flow(b, mode):
        r = b.rank
        with mode:
            recv_x, _, recv_w, _, handle, _ = layout_and_dispatch(b, xs[r], idx[r], ws[r])
            combined = b.combine(recv_x, handle, topk_weights=recv_w)[:2]
            ll_x, _, ll_handle, _, _ = b.low_latency_dispatch(xs[r], idx[r], 12, E, use_fp8=False)
            ll = b.low_latency_combine(ref.ll_expert_function(ll_x, r, local), idx[r], ws[r], ll_handle)[0].clone()
        return recv_x, combined, ll

    buffers = Buffer.virtual(R, device="cpu", timeout=30)
    try:
        first = run_ranks(buffers, lambda b: rank_flow(b, torch.inference_mode()), timeout=30)
        for mode in (torch.enable_grad, torch.no_grad):
            later = run_ranks(buffers, lambda b: rank_flow(b, mode()), timeout=30)
            for r, (a, b) in enumerate(zip(first, later)):
                assert torch.equal(a[0], want[r]["x"]) and torch.equal(b[0], want[r]["x"]), r
                assert all(torch.equal(u, v) for u, v in zip(a[1], b[1])) and torch.equal(a[2], b[2]), r
    finally:
        for b in buffers:
            b.destroy()
