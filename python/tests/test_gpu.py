"""The GPU backend through the Python package, with PyTorch CUDA tensors, equals the CPU backend
bit for bit (received rows, received routing, counters, combined rows). Gated: set
EP_GPU_TESTS=1 on a machine with a CUDA GPU, PyTorch and NVRTC."""

import os

import numpy as np
import pytest

import expert_parallel as ep
from reference import random_routing

GPU = os.environ.get("EP_GPU_TESTS") == "1"
pytestmark = pytest.mark.skipif(not GPU, reason="needs a GPU: set EP_GPU_TESTS=1")
if GPU:
    import torch

DEVICE = "cuda:0"
# (ranks, experts, top_k, hidden, max_tokens)
SHAPES = [(1, 4, 2, 64, 8), (2, 6, 3, 40, 16), (4, 8, 5, 24, 12), (8, 32, 8, 128, 24), (2, 32, 32, 8, 6),
          (8, 8, 1, 4, 9)]


def torch_dtype(name):
    return {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[name]


def make_step(seed, shape, dtype, recv_shape, *, index_dtype="int32", minus_one_rate=0.1, tokens=None,
              recv_routing_shape=None):
    """One step's inputs as CPU torch tensors: tokens, routing, weights, expert outputs and (with
    `recv_routing_shape`) the weight gradients of HT's backward pass."""
    ranks, experts, top_k, hidden, max_tokens = shape
    rng = np.random.default_rng(seed)
    tokens = tokens or [int(rng.integers(0, max_tokens + 1)) for _ in range(ranks)]
    index = {"int32": torch.int32, "int64": torch.int64}[index_dtype]
    idx = [torch.from_numpy(random_routing(rng, b, experts, top_k, minus_one_rate)).to(index) for b in tokens]
    xs = [(torch.from_numpy(rng.standard_normal((b, hidden)).astype(np.float32)) * 3).to(torch_dtype(dtype)) for b in tokens]
    weights = [torch.from_numpy(rng.random((b, top_k)).astype(np.float32)) for b in tokens]
    ys = [(torch.from_numpy(rng.standard_normal(recv_shape).astype(np.float32)) * 3).to(torch_dtype(dtype))
          for _ in range(ranks)]
    if recv_routing_shape is None:
        return xs, idx, weights, ys
    grads = [torch.from_numpy(rng.standard_normal(recv_routing_shape).astype(np.float32)) for _ in range(ranks)]
    return xs, idx, weights, ys, grads


def cuda(tensors):
    return [t.to(DEVICE) for t in tensors]


def run(group, xs, idx, weights, ys, direction="forward", grads=None, **kwargs):
    """dispatch + combine; returns (dispatch result, combined, weight gradients or None)."""
    out = group.dispatch(xs, idx, weights, **kwargs)
    if direction == "backward" and group.algorithm == "ht":
        combined, weight_grads = group.combine(ys, out.handle, direction=direction, weight_gradients=grads, **kwargs)
    else:
        combined, weight_grads = group.combine(ys, out.handle, direction=direction, **kwargs), None
    group.check()
    return out, combined, weight_grads


def same_bits(a, b):
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def expect_same(gpu, cpu, label, ranks=None):
    (gout, gcombined, ggrads), (cout, ccombined, cgrads) = gpu, cpu
    for r in ranks if ranks is not None else range(len(ccombined)):
        assert same_bits(gout.tokens[r], cout.tokens[r]), f"{label} rank {r}: received rows"
        if cout.topk_idx is not None:
            assert same_bits(gout.topk_idx[r], cout.topk_idx[r]), f"{label} rank {r}: received topk_idx"
            assert same_bits(gout.topk_weights[r], cout.topk_weights[r]), f"{label} rank {r}: received weights"
        assert gout.layout[r] == cout.layout[r], f"{label} rank {r}: {gout.layout[r]} != {cout.layout[r]}"
        assert same_bits(gcombined[r], ccombined[r]), f"{label} rank {r}: combined rows"
        if cgrads is not None:
            assert same_bits(ggrads[r], cgrads[r]), f"{label} rank {r}: weight gradients"


def groups(shape, **settings):
    ranks, experts, top_k, hidden, max_tokens = shape
    common = dict(ranks=ranks, experts=experts, hidden=hidden, top_k=top_k, max_tokens=max_tokens, **settings)
    return ep.VirtualGroup(device=DEVICE, **common), ep.VirtualGroup(device="cpu", **common)


# (algorithm, layout, alignment)
LAYOUTS = [("ll", "expert_major", 1), ("ll", "rank_major", 1), ("ht", "flat", 1), ("ht", "expert_major_padded", 1),
           ("ht", "expert_major_padded", 16)]


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
def test_gpu_matches_cpu_bit_for_bit(algorithm, layout, alignment, dtype, index_dtype):
    for i, shape in enumerate(SHAPES):
        gpu, cpu = groups(shape, algorithm=algorithm, layout=layout, alignment=alignment, dtype=dtype)
        assert (gpu.recv_shape, gpu.recv_routing_shape) == (cpu.recv_shape, cpu.recv_routing_shape)
        for step in range(4):
            xs, idx, w, ys, grads = make_step(100 * i + step, shape, dtype, cpu.recv_shape, index_dtype=index_dtype,
                                              minus_one_rate=0.3 if step == 0 else 0.05,
                                              recv_routing_shape=cpu.recv_routing_shape or (1,))
            direction = "backward" if step % 2 == 1 else "forward"
            launch = "per_rank" if step == 2 else "single"
            label = f"{layout}({alignment}) {dtype} {index_dtype} shape {shape} step {step} {direction} {launch}"
            expect_same(run(gpu, cuda(xs), cuda(idx), cuda(w), cuda(ys), direction, cuda(grads), launch=launch),
                        run(cpu, xs, idx, w, ys, direction, grads), label)


@pytest.mark.parametrize("layout", ["expert_major", "rank_major"])
def test_a_decode_sized_step_matches_the_cpu(layout):
    shape = (8, 64, 8, 7168, 64)  # DeepSeek-V3's hidden size and top-k; 64 tokens per rank
    gpu, cpu = groups(shape, layout=layout, dtype="bf16")
    xs, idx, w, ys = make_step(7, shape, "bf16", cpu.recv_shape, tokens=[64] * 8, minus_one_rate=0.0)
    expect_same(run(gpu, cuda(xs), cuda(idx), cuda(w), cuda(ys)), run(cpu, xs, idx, w, ys), f"decode {layout}")


def test_calls_run_on_the_current_stream():
    shape = (4, 16, 4, 256, 32)
    gpu, cpu = groups(shape, dtype="bf16")
    xs, idx, w, ys = make_step(11, shape, "bf16", cpu.recv_shape)
    gxs, gidx, gw, gys = cuda(xs), cuda(idx), cuda(w), cuda(ys)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = run(gpu, gxs, gidx, gw, gys)
    torch.cuda.synchronize()
    expect_same(result, run(cpu, xs, idx, w, ys), "side stream")


def test_a_masked_rank_matches_the_cpu():
    shape = (4, 16, 4, 32, 8)
    gpu, cpu = groups(shape, dtype="bf16")
    gpu.deactivate(2)
    cpu.deactivate(2)
    assert gpu.active_ranks == cpu.active_ranks == [0, 1, 3]
    xs, idx, w, ys = make_step(5, shape, "bf16", cpu.recv_shape, tokens=[8] * 4)
    result = run(gpu, cuda(xs), cuda(idx), cuda(w), cuda(ys))
    expect_same(result, run(cpu, xs, idx, w, ys), "rank 2 masked", ranks=[0, 1, 3])
    assert not result[0].tokens[2].any(), "the masked rank received nothing"
    gpu.clean()
    assert gpu.active_ranks == [0, 1, 2, 3]


@pytest.mark.parametrize("layout", ["flat", "expert_major_padded"])
def test_ht_drop_policy_matches_the_cpu(layout):
    shape = (4, 16, 4, 32, 12)
    settings = dict(algorithm="ht", layout=layout, dtype="bf16", max_recv_tokens=17, overflow="drop")
    if layout == "expert_major_padded":
        settings["alignment"] = 4
    gpu, cpu = groups(shape, **settings)
    xs, idx, w, ys = make_step(8, shape, "bf16", cpu.recv_shape, tokens=[12] * 4, minus_one_rate=0.0)
    result = run(gpu, cuda(xs), cuda(idx), cuda(w), cuda(ys))
    expected = run(cpu, xs, idx, w, ys)
    expect_same(result, expected, f"drop {layout}")
    assert sum(expected[0].layout[r].dropped_tokens for r in range(4)) > 0, "the step must overflow to test dropping"


def test_ht_overflow_on_the_gpu_is_reported_by_check():
    shape = (2, 4, 2, 16, 6)
    gpu, cpu = groups(shape, algorithm="ht", dtype="bf16", max_recv_tokens=2)
    xs, idx, w, _ = make_step(6, shape, "bf16", cpu.recv_shape, tokens=[6, 6], minus_one_rate=0.0)
    with pytest.raises(ep.ReceiveOverflowError, match="overflow: rank"):
        cpu.dispatch(xs, idx, w)
    gpu.dispatch(cuda(xs), cuda(idx), cuda(w))
    with pytest.raises(ep.ReceiveOverflowError, match="overflow: rank"):
        gpu.check()


def test_gpu_group_rejects_host_and_non_contiguous_tensors():
    shape = (2, 4, 2, 16, 4)
    gpu, cpu = groups(shape, dtype="bf16")
    xs, idx, w, _ = make_step(3, shape, "bf16", cpu.recv_shape, tokens=[4, 4])
    gxs, gidx, gw = cuda(xs), cuda(idx), cuda(w)
    with pytest.raises(ep.InvalidArgumentError, match=r"xs\[0\]: a NumPy array; a GPU group takes CUDA torch tensors"):
        gpu.dispatch([x.float().numpy() for x in xs], idx, w)
    with pytest.raises(ep.InvalidArgumentError, match=r"xs\[1\]: on cpu; must be on cuda:0"):
        gpu.dispatch([gxs[0], xs[1]], gidx, gw)
    with pytest.raises(ep.InvalidArgumentError, match=r"topk_idx\[0\]: on cpu; must be on cuda:0"):
        gpu.dispatch(gxs, idx, gw)
    wide = torch.zeros((4, 32), dtype=torch.bfloat16, device=DEVICE)[:, ::2]
    with pytest.raises(ep.InvalidArgumentError, match=r"xs\[0\]: not contiguous"):
        gpu.dispatch([wide, gxs[1]], gidx, gw)
    with pytest.raises(ep.InvalidArgumentError, match=r"xs\[1\]: dtype torch.float16; must be bf16"):
        gpu.dispatch([gxs[0], gxs[1].half()], gidx, gw)


def test_invalid_routing_on_the_gpu_is_reported_by_check():
    shape = (2, 4, 2, 16, 4)
    gpu, cpu = groups(shape, dtype="bf16")
    xs, idx, w, _ = make_step(4, shape, "bf16", cpu.recv_shape, tokens=[2, 2], minus_one_rate=0.0)
    idx[1][0, 1] = 99
    out = gpu.dispatch(cuda(xs), cuda(idx), cuda(w))
    # The rank with the bad entry reports it; its peers report that it failed.
    with pytest.raises((ep.InvalidArgumentError, ep.PeerFailedError), match=r"rank 1"):
        gpu.check()
    with pytest.raises(ep.ExpertParallelError):
        _ = out.layout
