"""The package's engine-speed data path on the GPU, bit for bit against the CPU backend: CUDA
graphs capturing update + dispatch + combine replayed with new routing, several live handles,
per-expert counts on the device, send-only calls with their hooks, streams and events. Gated: set
EP_GPU_TESTS=1 on a machine with a CUDA GPU, PyTorch and NVRTC."""

import os

import numpy as np
import pytest

import expert_parallel as ep

GPU = os.environ.get("EP_GPU_TESTS") == "1"
pytestmark = pytest.mark.skipif(not GPU, reason="needs a GPU: set EP_GPU_TESTS=1")
if GPU:
    import torch

DEVICE = "cuda:0"
R, E, K, H, B = 4, 16, 4, 64, 8


def step(seed):
    """Stacked CPU tensors: tokens [R, B, H] bf16, routing [R, B, K] int32, weights [R, B, K]."""
    rng = np.random.default_rng(seed)
    idx = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(B)]) for _ in range(R)]).astype(np.int32)
    idx[rng.random(idx.shape) < 0.1] = -1
    x = torch.from_numpy(rng.standard_normal((R, B, H)).astype(np.float32)).to(torch.bfloat16)
    return x, torch.from_numpy(idx), torch.from_numpy(rng.random((R, B, K)).astype(np.float32))


def pair(algorithm, **extra):
    common = dict(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, algorithm=algorithm, **extra)
    return ep.VirtualGroup(device=DEVICE, **common), ep.VirtualGroup(device="cpu", **common)


def on_cpu(cpu, inputs):
    """The CPU backend's step with identity experts: (received, counts, combined) as tensors."""
    x, idx, w = inputs
    out = cpu.dispatch([t for t in x], [t for t in idx], [t for t in w])
    combined = cpu.combine([t.clone() for t in out.tokens], out.handle)
    return out, [c.clone() for c in combined]


def same_bits(a, b):
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("algorithm", ["ll", "ht"])
def test_a_captured_step_replays_100_times_with_new_routing(algorithm):
    gpu, cpu = pair(algorithm, buffer_slots=1)
    x, idx, w = (t.to(DEVICE) for t in step(0))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm up: kernels compiled, the slot's buffers made
        out = gpu.dispatch(x, idx, w)
        gpu.combine(out.received, out.handle)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gpu.dispatch(x, idx, w)
        combined = gpu.combine(out.received, out.handle)
    for seed in range(1, 101):
        inputs = step(seed)
        for static, new in zip((x, idx, w), inputs):
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want, want_combined = on_cpu(cpu, inputs)
        for r in range(R):
            assert out.expert_counts[r].tolist() == want.layout[r].expert_counters, f"replay {seed} rank {r}: counts"
            assert same_bits(combined[r], want_combined[r]), f"replay {seed} rank {r}: combined"
    gpu.check()


def test_four_live_handles_and_a_backward_dispatch_match_the_cpu():
    gpu, cpu = pair("ll", buffer_slots=4)
    steps = [step(10 + i) for i in range(4)]
    handles = [gpu.handle() for _ in steps]
    outs = [gpu.dispatch(*(t.to(DEVICE) for t in s), handle=h) for s, h in zip(steps, handles)]
    for i in reversed(range(4)):
        want, want_combined = on_cpu(cpu, steps[i])
        got = gpu.combine(outs[i].received.clone(), handles[i])
        torch.cuda.synchronize()
        for r in range(R):
            assert same_bits(got[r], want_combined[r]), f"step {i} rank {r}: combined"
            assert outs[i].expert_source_counts[r].tolist() == want.layout[r].expert_source_counters
    # Backward: the first handle's routing again, other steps in between.
    grads = steps[0][0].to(DEVICE)
    back = gpu.dispatch(grads, None, steps[0][2].to(DEVICE), handle=handles[0], direction="backward")
    want, _ = on_cpu(cpu, steps[0])
    for r in range(R):   # the received rows (the rest of a reused slot holds earlier steps' rows)
        for e, count in enumerate(want.layout[r].expert_counters):
            assert same_bits(back.tokens[r][e, :count], want.tokens[r][e, :count]), f"backward rank {r} expert {e}"
    for h in handles:
        h.release()
    gpu.check()


def test_send_only_calls_complete_through_their_hooks_on_another_stream():
    gpu, cpu = pair("ll")
    inputs = step(5)
    x, idx, w = (t.to(DEVICE) for t in inputs)
    stream = torch.cuda.Stream()
    ready = torch.cuda.Event()
    ready.record()
    out = gpu.dispatch(x, idx, w, stream=stream, wait_event=ready, send_only=True, record_event=True)
    assert out.event is not None and out.hook is not None
    out.hook()
    combined, hook, event = gpu.combine(out.received, out.handle, stream=stream, send_only=True, record_event=True)
    hook()
    torch.cuda.current_stream().wait_event(event)
    torch.cuda.synchronize()
    _, want = on_cpu(cpu, inputs)
    for r in range(R):
        assert same_bits(combined[r], want[r]), f"rank {r}: combined"
    gpu.check()


@pytest.mark.parametrize("algorithm", ["ll", "ht"])
def test_a_one_rank_nccl_group_is_zero_copy_and_matches_the_cpu(algorithm):
    """One GPU, one NCCL rank: dispatch receives into the group's own buffers and combine reads
    the expert outputs from its own buffer, nothing copied; the same bits as the CPU backend."""
    common = dict(experts=8, hidden=H, top_k=K, max_tokens=B, algorithm=algorithm)
    group = ep.NCCLGroup(rank=0, ranks=1, unique_id=ep.nccl_unique_id(), device=0, **common)
    cpu = ep.VirtualGroup(ranks=1, device="cpu", **common)
    try:
        for seed in range(3):
            rng = np.random.default_rng(seed)
            idx = torch.from_numpy(np.stack([rng.choice(8, K, replace=False) for _ in range(B)]).astype(np.int32))
            x = torch.from_numpy(rng.standard_normal((B, H)).astype(np.float32)).to(torch.bfloat16)
            w = torch.from_numpy(rng.random((B, K)).astype(np.float32))
            with group.handle() as h:
                out = group.dispatch(x.to(DEVICE), idx.to(DEVICE), w.to(DEVICE), handle=h, send_only=True)
                out.hook()
                received_pointer = out.tokens.data_ptr()
                out.expert_outputs.copy_(out.tokens)   # identity experts, written where the peers read
                combined = group.combine(out.expert_outputs, h)
                # Into a tensor of the caller's, with weights given to combine (LL expert-major: other weights).
                mine = torch.full((B, H), float("nan"), dtype=torch.bfloat16, device=DEVICE)
                other = w.flip(1).contiguous()
                given = dict(topk_weights=other.to(DEVICE)) if algorithm == "ll" else {}
                into = group.combine(out.expert_outputs, h, out=mine, **given)
                torch.cuda.synchronize()
                want = cpu.dispatch([x], [idx], [w])
                want_combined = [t.clone() for t in cpu.combine([t.clone() for t in want.tokens], want.handle)]
                want_into = cpu.combine([t.clone() for t in want.tokens], want.handle,
                                        **({"topk_weights": [other]} if algorithm == "ll" else {}))
                assert out.tokens.data_ptr() == received_pointer
                assert out.expert_counts.tolist() == want.layout[0].expert_counters
                assert same_bits(combined, want_combined[0]), f"seed {seed}: combined"
                assert into is mine and same_bits(mine, want_into[0]), f"seed {seed}: combined into out= with combine's weights"
                assert out.layout == want.layout[0]
        group.check()
    finally:
        group.close()


@pytest.mark.parametrize("algorithm", ["ll", "ht"])
@pytest.mark.parametrize("send_only, offset", [(False, 0), (True, 0), (False, 1)])
def test_a_one_rank_nccl_group_combines_from_a_callers_tensor(algorithm, send_only, offset):
    """Expert outputs in a tensor of the caller's (what DeepEP code passes): the library copies
    the rows the step received into the buffer the peers read, also for a send-only combine
    completed through its hook; the rows outside them are not copied (the buffer keeps what it
    held); the same bits as the CPU backend. The caller's rows outside the step are NaN, so a
    combine that read them would show it. `offset` 1: the caller's tensor a view one element into
    its storage (2-byte aligned: copied whole, the same results)."""
    common = dict(experts=8, hidden=H, top_k=K, max_tokens=B, algorithm=algorithm)
    group = ep.NCCLGroup(rank=0, ranks=1, unique_id=ep.nccl_unique_id(), device=0, **common)
    cpu = ep.VirtualGroup(ranks=1, device="cpu", **common)
    try:
        for seed in range(3):
            rng = np.random.default_rng(seed + 10)
            idx = torch.from_numpy(np.stack([rng.choice(8, K, replace=False) for _ in range(B)]).astype(np.int32))
            idx[torch.from_numpy(rng.random((B, K)) < 0.2)] = -1
            idx[-2:] = -1   # two tokens sent nowhere: HT at one rank receives fewer rows than it holds
            x = torch.from_numpy(rng.standard_normal((B, H)).astype(np.float32)).to(torch.bfloat16)
            w = torch.from_numpy(rng.random((B, K)).astype(np.float32))
            with group.handle() as h:
                out = group.dispatch(x.to(DEVICE), idx.to(DEVICE), w.to(DEVICE), handle=h)
                want = cpu.dispatch([x], [idx], [w])
                counts = out.expert_counts.tolist()
                rows = out.tokens.view(-1, H)   # every row of the receive buffer ([L, Bmax, H] for LL expert-major)
                used = torch.zeros(rows.shape[0], dtype=torch.bool)
                if algorithm == "ll":   # expert-major at one rank: local expert l's rows from l * max_tokens
                    for l, n in enumerate(counts):
                        used[l * B:l * B + n] = True
                else:   # flat: the first rows
                    used[:want.layout[0].received_total] = True
                assert 0 < int(used.sum()) < used.numel()
                mine = torch.full((out.tokens.numel() + offset,), float("nan"), dtype=out.tokens.dtype,
                                  device=DEVICE)[offset:].view(out.tokens.shape)
                mine.view(-1, H)[used.to(DEVICE)] = rows[used.to(DEVICE)]   # identity experts, in the caller's tensor
                out.expert_outputs.fill_(7.0)
                if send_only:
                    combined, hook = group.combine(mine, h, send_only=True)
                    hook()
                else:
                    combined = group.combine(mine, h)
                torch.cuda.synchronize()
                want_combined = cpu.combine([t.clone() for t in want.tokens], want.handle)
                assert counts == want.layout[0].expert_counters
                assert same_bits(combined, want_combined[0]), f"seed {seed}: combined"
                shared = out.expert_outputs.cpu().view(-1, H)
                assert torch.equal(shared[used], mine.cpu().view(-1, H)[used]), f"seed {seed}: the received rows copied"
                if offset == 0:
                    assert bool((shared[~used] == 7.0).all()), f"seed {seed}: rows outside the step were copied"
        group.check()
    finally:
        group.close()
