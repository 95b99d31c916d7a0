"""expert_parallel.compat.deep_ep on the GPU: the intranode and low-latency flows with CUDA tensors
at R = 4 virtual ranks on one GPU (one thread per rank) and at R = 1 under torch.distributed with
NCCL (NCCLGroup.from_process_group), against the plain-PyTorch reference and bit for bit against
the CPU backend. Gated: set EP_GPU_TESTS=1 on a machine with a CUDA GPU, PyTorch and NVRTC."""

import os

import pytest

GPU = os.environ.get("EP_GPU_TESTS") == "1"
pytestmark = pytest.mark.skipif(not GPU, reason="needs a GPU: set EP_GPU_TESTS=1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import deep_ep_flows as flows  # noqa: E402
import deep_ep_reference as ref  # noqa: E402
from expert_parallel.compat.deep_ep import Buffer  # noqa: E402

R, E, H, K = 4, 16, 128, 3
TOKENS = [6, 0, 10, 7]
DEVICE = "cuda:0"


@pytest.fixture(scope="module")
def ranks():
    yield from flows.virtual_buffers(R, device=DEVICE, timeout=60)


@pytest.fixture(scope="module")
def cpu_ranks():
    yield from flows.virtual_buffers(R, timeout=60)


@pytest.mark.parametrize("async_finish", [False, True])
def test_intranode_flow_on_virtual_ranks_matches_the_reference(ranks, async_finish):
    xs, idx, ws = ref.make_inputs(21, TOKENS, E, H, K)
    results = flows.intranode(ranks, xs, idx, ws, E, alignment=8, async_finish=async_finish)
    torch.cuda.synchronize()
    flows.check_intranode(results, xs, idx, ws, E, alignment=8)


@pytest.mark.parametrize("hook", [False, True])
def test_low_latency_flow_on_virtual_ranks_matches_the_reference(ranks, hook):
    xs, idx, ws = ref.make_inputs(22, TOKENS, E, H, K)
    results = flows.low_latency(ranks, xs, idx, ws, E, max_tokens=16, hook=hook, async_finish=hook)
    torch.cuda.synchronize()
    flows.check_low_latency(results, xs, idx, ws, E, max_tokens=16)


def test_gpu_equals_the_cpu_backend_bit_for_bit_with_rounding(ranks, cpu_ranks):
    """Inputs whose sums round (bf16 normals): both backends give the same bits."""
    xs, idx, ws = ref.make_inputs(23, TOKENS, E, H, K)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(x.shape, generator=g).bfloat16() for x in xs]
    ws = [torch.rand(w.shape, generator=g) for w in ws]
    gpu = flows.intranode(ranks, xs, idx, ws, E)
    cpu = flows.intranode(cpu_ranks, xs, idx, ws, E)
    for a, b in zip(gpu, cpu):
        for key in ("recv_x", "recv_idx", "recv_w", "combined", "combined_w", "grad_x", "grad_topk"):
            assert torch.equal(a[key], b[key]), key
        assert a["counts"] == b["counts"]
    gpu = flows.low_latency(ranks, xs, idx, ws, E, max_tokens=16)
    cpu = flows.low_latency(cpu_ranks, xs, idx, ws, E, max_tokens=16)
    for a, b in zip(gpu, cpu):
        assert torch.equal(a["combined"], b["combined"]) and torch.equal(a["flipped"], b["flipped"])
        for (ax, ac), (bx, bc) in zip(a["received"], b["received"]):
            assert torch.equal(ac, bc)
            for e, c in enumerate(ac.tolist()):
                assert torch.equal(ax[e, :c], bx[e, :c])


@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
def test_low_latency_fp8_on_the_gpu_equals_the_cpu(ranks, cpu_ranks, round_scale, use_ue8m0):
    hidden, bmax = 1024, 8
    xs, idx, ws = ref.make_inputs(7, [3, 4, 0, 2], E, hidden, K)
    xs = [x.float().mul(torch.linspace(0.01, 30, hidden)).bfloat16() for x in xs]

    def flow(device):
        def run(b):
            x, i = xs[b.rank].to(device), idx[b.rank].to(device)
            (codes, scales), count, _, _, _ = b.low_latency_dispatch(x, i, bmax, E, round_scale=round_scale, use_ue8m0=use_ue8m0)
            return flows.cpu(codes.view(torch.uint8)), flows.cpu(scales.contiguous()), flows.cpu(count)
        return run

    gpu = flows.on_ranks(ranks, flow(DEVICE))
    cpu = flows.on_ranks(cpu_ranks, flow("cpu"))
    for r, ((gc, gs, gn), (cc, cs, cn)) in enumerate(zip(gpu, cpu)):
        assert torch.equal(gn, cn), f"rank {r}: counts"
        for e, c in enumerate(cn.tolist()):   # rows past the counts are unspecified
            assert torch.equal(gc[e, :c], cc[e, :c]), f"rank {r} expert {e}: e4m3 rows"
            assert torch.equal(gs[e, :c], cs[e, :c]), f"rank {r} expert {e}: scales"


def test_intranode_fp8_tuple_on_the_gpu_equals_the_cpu(ranks, cpu_ranks):
    hidden = 256
    xs, idx, ws = ref.make_inputs(8, TOKENS, E, hidden, K, torch.float32)
    codes = [x.div(16).to(torch.float8_e4m3fn) for x in xs]
    scales = [torch.rand(x.shape[0], hidden // 128) for x in xs]

    def flow(device):
        def run(b):
            r = b.rank
            layout = b.get_dispatch_layout(idx[r].to(device), E)
            (recv, recv_scales), recv_idx, _, _, _, _ = b.dispatch(
                (codes[r].to(device), scales[r].to(device)), num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                num_tokens_per_expert=layout[2], topk_idx=idx[r].to(device), topk_weights=ws[r].to(device))
            return flows.cpu(recv.view(torch.uint8)), flows.cpu(recv_scales), flows.cpu(recv_idx)
        return run

    for r, (g, c) in enumerate(zip(flows.on_ranks(ranks, flow(DEVICE)), flows.on_ranks(cpu_ranks, flow("cpu")))):
        for name, a, b in zip(("rows", "scales", "topk_idx"), g, c):
            assert torch.equal(a, b), f"rank {r}: {name}"


def test_one_rank_under_torch_distributed_nccl(tmp_path):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        buffer = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 24, num_rdma_bytes=0)
        assert buffer.device.startswith("cuda") and buffer.group_size == 1
        # FP8 low-latency dispatch (DeepEP's default use_fp8=True) through the NCCL rank group: the
        # same e4m3 rows and scales as the CPU backend's one rank.
        xs, idx, _ = ref.make_inputs(26, [5], 8, H, 2)
        cpu = Buffer.virtual(1, device="cpu")[0]
        (codes, scales), count, _, _, _ = buffer.low_latency_dispatch(xs[0].to("cuda"), idx[0].to("cuda"), 8, 8)
        (want_codes, want_scales), want_count, _, _, _ = cpu.low_latency_dispatch(xs[0], idx[0], 8, 8)
        torch.cuda.synchronize()
        assert torch.equal(count.cpu(), want_count)
        for e, c in enumerate(want_count.tolist()):   # rows past the counts are unspecified
            assert torch.equal(codes[e, :c].cpu().view(torch.uint8), want_codes[e, :c].view(torch.uint8)), f"expert {e}: e4m3 rows"
            assert torch.equal(scales[e, :c].cpu(), want_scales[e, :c]), f"expert {e}: scales"
        xs, idx, ws = ref.make_inputs(24, [12], 8, H, 2)
        results = flows.intranode([buffer], xs, idx, ws, 8, alignment=4)
        torch.cuda.synchronize()
        flows.check_intranode(results, xs, idx, ws, 8, alignment=4)
        xs, idx, ws = ref.make_inputs(25, [7], 8, H, 2)
        for hook in (True, False):   # split calls (events), whole calls (none: the current stream orders them)
            results = flows.low_latency([buffer], xs, idx, ws, 8, max_tokens=8, hook=hook, async_finish=hook)
            torch.cuda.synchronize()
            flows.check_low_latency(results, xs, idx, ws, 8, 8)
        buffer.destroy()
    finally:
        dist.destroy_process_group()
