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


def test_e4m3_rows_to_combine_are_a_named_error():
    shape = (2, 4, 2, 128, 4)
    gpu, _ = fp8_groups(shape, dtype="bf16", fp8="float32")
    xs, idx, w, _ = make_step(3, shape, "bf16", gpu.recv_shape, tokens=[4, 4])
    out = gpu.dispatch(cuda(xs), cuda(idx), cuda(w))
    with pytest.raises(ep.InvalidArgumentError, match="expert"):
        gpu.combine([t.clone() for t in out.tokens], out.handle)
