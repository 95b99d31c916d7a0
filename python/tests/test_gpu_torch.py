"""expert_parallel.torch on one GPU with virtual ranks. Gated: set EP_GPU_TESTS=1 on a machine
with a CUDA GPU, PyTorch and NVRTC.

- The ops themselves (dispatch, combine, the backward dispatch and combine with HT's weight
  gradients) give the CPU backend's bits: dispatch outputs start as zeros on both, so whole
  tensors compare.
- A MoE through the ops equals the dense reference: float32 within 1e-5, bf16 within 2e-2 of the
  largest value (the group rounds rows and partial sums to bf16; the reference is float32).
- torch.compile(fullgraph=True) with inductor on CUDA equals eager mode (float32 within 1e-5).
- examples/moe_layer.py's block in bf16, eager and compiled, within the example's 3e-2."""

import os

import pytest

import expert_parallel as ep
from test_torch_autograd import B, E, H, K, LAYOUTS, R, assert_close, run
from torch_moe import dense, over_group, routing

GPU = os.environ.get("EP_GPU_TESTS") == "1"
pytestmark = pytest.mark.skipif(not GPU, reason="needs a GPU: set EP_GPU_TESTS=1")
if GPU:
    import torch

    from expert_parallel.torch import Exchange

DEVICE = "cuda:0"


def exchange(algorithm, layout, device, dtype="f32"):
    group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype=dtype, device=device,
                            algorithm=algorithm, layout=layout, alignment=4 if layout == "expert_major_padded" else 1)
    return Exchange(group)


def on(device, inputs):
    return tuple(t.to(device) for t in inputs)


def ops_outputs(ex, inputs, probe):
    """Every op's outputs for one step (moved to the CPU)."""
    x, idx, w, _ = inputs
    ops = torch.ops.expert_parallel
    received, ridx, rw, step, counts = ops.dispatch(x, idx, None if ex.layout == "expert_major" else w, ex.id)
    weights = w if ex.layout == "expert_major" else rw if ex.layout == "expert_major_padded" else None
    combined = ops.combine(received * 2, idx, weights, step, ex.id)
    rows = ops.backward_dispatch(probe, step, ex.id)
    grad_w_in = None if ex.group.algorithm == "ll" else rw * 3
    grad_x, grad_w = ops.backward_combine(received, grad_w_in, step, ex.id, B)
    torch.cuda.synchronize()
    return [t.cpu() for t in (received, ridx, rw, combined, rows, grad_x, grad_w, counts)]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_the_ops_give_the_cpu_backends_bits(algorithm, layout, dtype):
    kind = torch.float32 if dtype == "f32" else torch.bfloat16
    inputs = routing(40, R, B, E, K, H, dtype=kind)
    probe = torch.randn(R, B, H).to(kind)
    cpu = ops_outputs(exchange(algorithm, layout, "cpu", dtype), inputs, probe)
    gpu = ops_outputs(exchange(algorithm, layout, DEVICE, dtype), on(DEVICE, inputs), probe.to(DEVICE))
    names = ("received", "received topk_idx", "received topk_weights", "combined", "backward dispatch",
             "backward combine", "weight gradients")
    for name, a, b in zip(names, gpu, cpu):
        assert a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{layout}: {name}"


@pytest.mark.parametrize("dtype,tolerance", [("f32", 1e-5), ("bf16", 2e-2)])
@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_gradients_equal_the_dense_reference_on_the_gpu(algorithm, layout, dtype, tolerance):
    kind = torch.float32 if dtype == "f32" else torch.bfloat16
    ex = exchange(algorithm, layout, DEVICE, dtype)
    inputs = on(DEVICE, routing(41, R, B, E, K, H, dtype=kind))
    reference = run(dense, tuple(t.float() if t.is_floating_point() else t for t in inputs))
    got = run(lambda *a: over_group(ex, *a), inputs)
    ex.group.check()
    assert_close(got, reference, tolerance, f"{layout} {dtype} on the GPU")


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_eager_calls_give_the_ops_bits_on_the_gpu(algorithm, layout):
    """Exchange's eager calls (no dispatcher: torch/_eager.py) and the ops (under a dispatch mode
    that only watches) give the same values and gradients, bit for bit, on CUDA too."""
    from test_torch_eager import Seen

    ex = exchange(algorithm, layout, DEVICE)
    inputs = on(DEVICE, routing(45, R, B, E, K, H))
    eager = run(lambda *a: over_group(ex, *a), inputs)
    watching = Seen()
    with watching:
        through_ops = run(lambda *a: over_group(ex, *a), inputs)
    ex.group.check()
    assert {"expert_parallel.dispatch.default", "expert_parallel.backward_combine.default"} <= watching.ops
    for name, a, b in zip(("combined", "grad x", "grad topk_weights", "grad experts"), eager, through_ops):
        assert torch.equal(a.cpu(), b.cpu()), f"{layout}: {name}"


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_inductor_on_cuda_equals_eager(algorithm, layout):
    torch._dynamo.reset()
    ex = exchange(algorithm, layout, DEVICE)
    compiled = torch.compile(lambda *a: over_group(ex, *a), fullgraph=True)
    for seed in range(2):
        inputs = on(DEVICE, routing(42 + seed, R, B, E, K, H))
        assert_close(run(compiled, inputs), run(lambda *a: over_group(ex, *a), inputs), 1e-5, f"{layout} compiled")
    ex.group.check()


@pytest.mark.parametrize("backend", [None, "inductor"])
@pytest.mark.parametrize("layout", ["expert_major", "flat", "expert_major_padded"])
def test_the_example_block_in_bf16_on_one_gpu(layout, backend):
    from test_moe_example import example

    torch._dynamo.reset()
    module = example()
    group = ep.VirtualGroup(ranks=4, experts=16, hidden=64, top_k=4, max_tokens=16, dtype="bf16", device=DEVICE,
                            algorithm=module.ALGORITHMS[layout], layout=layout,
                            alignment=8 if layout == "expert_major_padded" else 1)
    moe = module.MoEBlock(Exchange(group), ffn=32, shared_ffn=48, dtype=torch.bfloat16).to(DEVICE)
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16).to(DEVICE)
    differences = module.compare(moe, x, backend=backend)
    group.check()
    assert max(differences.values()) <= module.TOLERANCES[torch.bfloat16], differences


@pytest.mark.parametrize("algorithm,layout,weights_grad", [("ht", "flat", True), ("ht", "expert_major_padded", True),
                                                           ("ll", "rank_major", False)])
def test_the_ops_over_an_nccl_rank_of_one_give_the_cpu_backends_results(tmp_path, algorithm, layout, weights_grad):
    """An NCCLGroup of one rank (torch.distributed over NCCL, world of one) through the ops, against
    a CPU VirtualGroup of one rank: outputs and x's gradients bit for bit, topk_weights' within
    1e-5; three steps live across a reused buffer slot (test_torch_nccl_rank.py's comparison)."""
    import torch.distributed as dist

    from test_torch_nccl_rank import compare_with_the_reference, settings_of

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        settings = settings_of(algorithm, layout, "bf16")
        group = ep.NCCLGroup.from_process_group(**settings)
        reference = ep.VirtualGroup(ranks=1, device="cpu", **settings)
        on_rank, on_reference = Exchange(group), Exchange(reference)
        compare_with_the_reference(on_rank, on_reference, weights_grad, device=DEVICE, exact_weights=False)
        group.check()
        on_rank.close()
        on_reference.close()
        group.close()
        reference.close()
    finally:
        dist.destroy_process_group()
