"""FP8 dispatch on the GPU through the Python package, with PyTorch CUDA tensors, equals the CPU
backend bit for bit: the e4m3 rows (torch.float8_e4m3fn), their scales, the received routing,
the counters, and the combine after it. Quantising from bf16, f16 and f32, and passing the
caller's e4m3 rows and scales through, in every layout and scale mode. Gated: set EP_GPU_TESTS=1
on a machine with a CUDA GPU, PyTorch and NVRTC."""

import os

import numpy as np
import pytest

import expert_parallel as ep
from test_gpu import DEVICE, LAYOUTS, cuda, make_step, same_bits
from test_gpu import expect_same as expect_same_rows

GPU = os.environ.get("EP_GPU_TESTS") == "1"
pytestmark = pytest.mark.skipif(not GPU, reason="needs a GPU: set EP_GPU_TESTS=1")
if GPU:
    import torch

MODES = ["float32", "ue8m0", "e8m0"]
# (ranks, experts, top_k, hidden, max_tokens): hidden a multiple of 128 that is not whole 512s.
SHAPES = [(1, 4, 2, 640, 8), (2, 6, 3, 384, 12), (4, 8, 4, 128, 10), (8, 32, 8, 640, 16)]


def fp8_groups(shape, **settings):
    ranks, experts, top_k, hidden, max_tokens = shape
    common = dict(ranks=ranks, experts=experts, hidden=hidden, top_k=top_k, max_tokens=max_tokens, **settings)
    return ep.VirtualGroup(device=DEVICE, **common), ep.VirtualGroup(device="cpu", **common)


def pass_through_rows(seed, xs, words, mode):
    """Random e4m3 codes (NaN codes among them) shaped like `xs`, and random scale words."""
    g = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, 256, x.shape, generator=g, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn) for x in xs]
    scales = [torch.randint(-2**31, 2**31 - 1, (x.shape[0], words), generator=g, dtype=torch.int32) for x in xs]
    if mode == "float32":
        scales = [s.view(torch.float32) for s in scales]
    return codes, scales


def run(group, xs, idx, w, ys, scales=None, **kwargs):
    out = group.dispatch(xs, idx, w, **({} if scales is None else {"scales": scales}), **kwargs)
    combined = group.combine(ys, out.handle, **kwargs)
    group.check()
    return out, combined


def expect_same(gpu, cpu, label):
    """test_gpu's comparison (rows, routing, layout, combined), plus the e4m3 type and the scales."""
    (gout, gcombined), (cout, ccombined) = gpu, cpu
    for r in range(len(ccombined)):
        assert gout.tokens[r].dtype == torch.float8_e4m3fn, f"{label} rank {r}: rows are {gout.tokens[r].dtype}"
        assert same_bits(gout.scales[r], cout.scales[r]), f"{label} rank {r}: received scales"
    expect_same_rows((gout, gcombined, None), (cout, ccombined, None), label)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
def test_quantised_dispatch_matches_the_cpu(algorithm, layout, alignment, mode):
    for i, shape in enumerate(SHAPES):
        dtype = ["bf16", "f16", "f32", "bf16"][i]
        gpu, cpu = fp8_groups(shape, algorithm=algorithm, layout=layout, alignment=alignment, dtype=dtype, fp8=mode)
        assert gpu.recv_scales_shape == cpu.recv_scales_shape
        for step in range(3):
            xs, idx, w, ys = make_step(1000 * i + step, shape, dtype, cpu.recv_shape, minus_one_rate=0.3 if step == 0 else 0.05)
            launch = "per_rank" if step == 2 else "single"
            label = f"{layout}({alignment}) {mode} {dtype} shape {shape} step {step} {launch}"
            expect_same(run(gpu, cuda(xs), cuda(idx), cuda(w), cuda(ys), launch=launch), run(cpu, xs, idx, w, ys), label)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
def test_pass_through_moves_rows_and_scales_unchanged(algorithm, layout, alignment, mode):
    for i, shape in enumerate(SHAPES):
        gpu, cpu = fp8_groups(shape, algorithm=algorithm, layout=layout, alignment=alignment, dtype="bf16", fp8=mode,
                              fp8_source="pass_through")
        words = cpu.recv_scales_shape[-1]
        for step in range(2):
            xs, idx, w, ys = make_step(2000 * i + step, shape, "bf16", cpu.recv_shape)
            codes, scales = pass_through_rows(2000 * i + step, xs, words, mode)
            label = f"{layout}({alignment}) {mode} pass-through shape {shape} step {step}"
            expect_same(run(gpu, cuda(codes), cuda(idx), cuda(w), cuda(ys), scales=cuda(scales)),
                        run(cpu, codes, idx, w, ys, scales=scales), label)


def test_a_decode_sized_quantised_step_matches_the_cpu():
    shape = (8, 64, 8, 7168, 64)  # DeepSeek-V3's hidden size and top-k; 64 tokens per rank
    gpu, cpu = fp8_groups(shape, dtype="bf16", fp8="ue8m0")
    xs, idx, w, ys = make_step(7, shape, "bf16", cpu.recv_shape, tokens=[64] * 8, minus_one_rate=0.0)
    expect_same(run(gpu, cuda(xs), cuda(idx), cuda(w), cuda(ys)), run(cpu, xs, idx, w, ys), "decode ue8m0")


@pytest.mark.parametrize("source", ["quantize", "pass_through"])
@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
def test_a_dispatch_into_the_callers_fp8_tensors_matches_the_groups_own(algorithm, layout, alignment, source):
    """out= of an FP8 group: zeroed torch float8_e4m3fn rows, routing and the received scales
    (stacked), the same bits as the group's own (fresh, zeroed) buffers receive, and the same
    combine after it."""
    shape = (4, 8, 4, 384, 10)
    mode = {"quantize": "ue8m0", "pass_through": "float32"}[source]
    gpu, _ = fp8_groups(shape, algorithm=algorithm, layout=layout, alignment=alignment, dtype="bf16", fp8=mode, fp8_source=source)
    xs, idx, w, ys = make_step(31, shape, "bf16", gpu.recv_shape, tokens=[10] * 4)
    extra = {}
    if source == "pass_through":
        xs, scales = pass_through_rows(31, xs, gpu.recv_scales_shape[-1], mode)
        extra["scales"] = torch.stack(cuda(scales))
    x, i, ww, y = (torch.stack(cuda(t)) for t in (xs, idx, w, ys))
    own = gpu.dispatch(x, i, ww, **extra)
    own_combined = [t.clone() for t in gpu.combine(y, own.handle)]
    assert own.layout is not None   # (the host copy, read while the step is the group's)
    r = shape[0]
    tokens = torch.zeros((r,) + gpu.recv_shape, dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn)
    scale_type = torch.float32 if mode == "float32" else torch.int32
    scales_out = torch.zeros((r,) + gpu.recv_scales_shape, dtype=scale_type, device=DEVICE)
    routing = (None, None) if gpu.recv_routing_shape is None else (
        torch.zeros((r,) + gpu.recv_routing_shape, dtype=torch.int32, device=DEVICE),
        torch.zeros((r,) + gpu.recv_routing_shape, dtype=torch.float32, device=DEVICE))
    got = gpu.dispatch(x, i, ww, out=(tokens,) + routing + (None, scales_out), **extra)
    got_combined = gpu.combine(y, got.handle)
    gpu.check()
    assert all(got.scales[k].data_ptr() == scales_out[k].data_ptr() for k in range(r))
    expect_same((got, got_combined), (own, own_combined), f"{layout}({alignment}) {source} out=")


def test_e4m3_rows_to_combine_are_a_named_error():
    shape = (2, 4, 2, 128, 4)
    gpu, _ = fp8_groups(shape, dtype="bf16", fp8="float32")
    xs, idx, w, _ = make_step(3, shape, "bf16", gpu.recv_shape, tokens=[4, 4])
    out = gpu.dispatch(cuda(xs), cuda(idx), cuda(w))
    with pytest.raises(ep.InvalidArgumentError, match="expert"):
        gpu.combine([t.clone() for t in out.tokens], out.handle)


@pytest.mark.parametrize("source,mode", [("quantize", "ue8m0"), ("quantize", "e8m0"), ("pass_through", "float32")])
@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
def test_a_one_rank_nccl_group_dispatches_fp8_like_the_cpu(algorithm, layout, alignment, source, mode):
    """An NCCL rank group (one GPU, one rank) receives e4m3 rows and their scales into its own
    buffer slot, bit for bit as the CPU backend, and combines the expert outputs after them."""
    shape = (1, 8, 4, 256, 12)
    _, experts, top_k, hidden, max_tokens = shape
    common = dict(experts=experts, hidden=hidden, top_k=top_k, max_tokens=max_tokens, algorithm=algorithm, layout=layout,
                  alignment=alignment, dtype="bf16", fp8=mode, fp8_source=source)
    group = ep.NCCLGroup(rank=0, ranks=1, unique_id=ep.nccl_unique_id(), device=0, **common)
    cpu = ep.VirtualGroup(ranks=1, device="cpu", **common)
    try:
        assert group.recv_scales_shape == cpu.recv_scales_shape
        # Rows outside the received zones are unspecified: start both sides from zeros.
        for slot in group._slots:
            for buffer in (slot.tokens, slot.scales, slot.idx, slot.weights):
                if buffer is not None:
                    buffer.view(torch.uint8).zero_()
        for step in range(3):   # three steps: both buffer slots, then the first again
            xs, idx, w, ys = make_step(3000 + step, shape, "bf16", cpu.recv_shape)
            extra_gpu, extra_cpu = {}, {}
            if source == "pass_through":
                xs, scales = pass_through_rows(3000 + step, xs, cpu.recv_scales_shape[-1], mode)
                extra_gpu, extra_cpu = {"scales": scales[0].to(DEVICE)}, {"scales": scales}
            out = group.dispatch(xs[0].to(DEVICE), idx[0].to(DEVICE), w[0].to(DEVICE), **extra_gpu)
            out.expert_outputs.copy_(ys[0].to(DEVICE))
            combined = group.combine(out.expert_outputs, out.handle)
            torch.cuda.synchronize()
            want = cpu.dispatch(xs, idx, w, **extra_cpu)
            want_combined = cpu.combine(ys, want.handle)
            label = f"{layout}({alignment}) {source} {mode} step {step}"
            assert out.tokens.dtype == torch.float8_e4m3fn, label
            assert same_bits(out.tokens, want.tokens[0]), f"{label}: received rows"
            assert same_bits(out.scales, want.scales[0]), f"{label}: received scales"
            if want.topk_idx is not None:
                assert same_bits(out.topk_idx, want.topk_idx[0]), f"{label}: received topk_idx"
                assert same_bits(out.topk_weights, want.topk_weights[0]), f"{label}: received weights"
            assert out.layout == want.layout[0], label
            assert same_bits(combined, want_combined[0]), f"{label}: combined rows"
        group.check()
    finally:
        group.close()


def test_an_nccl_group_names_missing_or_unexpected_scales():
    common = dict(experts=4, hidden=128, top_k=2, max_tokens=4, dtype="bf16")
    passing = ep.NCCLGroup(rank=0, ranks=1, unique_id=ep.nccl_unique_id(), device=0, fp8="float32",
                           fp8_source="pass_through", **common)
    try:
        codes = torch.zeros((4, 128), dtype=torch.float8_e4m3fn, device=DEVICE)
        idx = torch.zeros((4, 2), dtype=torch.int32, device=DEVICE)
        idx[:, 1] = 1
        w = torch.ones((4, 2), dtype=torch.float32, device=DEVICE)
        with pytest.raises(ep.InvalidArgumentError, match="scales: None"):
            passing.dispatch(codes, idx, w)
    finally:
        passing.close()
    plain = ep.NCCLGroup(rank=0, ranks=1, unique_id=ep.nccl_unique_id(), device=0, **common)
    try:
        x = torch.zeros((4, 128), dtype=torch.bfloat16, device=DEVICE)
        with pytest.raises(ep.InvalidArgumentError, match="scales: given"):
            plain.dispatch(x, idx, w, scales=torch.zeros((4, 1), dtype=torch.float32, device=DEVICE))
    finally:
        plain.close()
