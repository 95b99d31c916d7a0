"""Soak on the GPU: a CUDA graph of update + dispatch + combine (LL, 8 virtual ranks) replayed
many times with routing that changes every replay, every Nth replay checked against the CPU
backend bit for bit, and the device memory in use compared before and after (it must not grow).

    EP_LIBRARY=... PYTHONPATH=python python3 scripts/soak.py [--replays 100000] [--check-every 1000]

Prints one summary line and exits 1 on any mismatch or growth."""

import argparse
import sys
import time

import numpy as np
import torch

import expert_parallel as ep

R, E, K, H, B = 8, 64, 4, 256, 16


def routing(rng):
    idx = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(B)]) for _ in range(R)]).astype(np.int32)
    idx[rng.random(idx.shape) < 0.05] = -1
    return torch.from_numpy(idx)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--replays", type=int, default=100_000)
    parser.add_argument("--check-every", type=int, default=1000)
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    device = args.device
    common = dict(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, algorithm="ll")
    gpu = ep.VirtualGroup(device=device, buffer_slots=1, **common)
    cpu = ep.VirtualGroup(device="cpu", **common)
    rng = np.random.default_rng(0)
    pool = [routing(rng).to(device) for _ in range(64)]   # routings cycled through, with a changing offset
    x = torch.randn(R, B, H, device=device).to(torch.bfloat16)
    w = torch.rand(R, B, K, device=device)
    idx = pool[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = gpu.dispatch(x, idx, w)
        gpu.combine(out.received, out.handle)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gpu.dispatch(x, idx, w)
        combined = gpu.combine(out.received, out.handle)
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info(device)
    checks = mismatches = 0
    start = time.perf_counter()
    for i in range(args.replays):
        idx.copy_(pool[(i * 7 + i // 64) % len(pool)])
        graph.replay()
        if (i + 1) % args.check_every == 0:
            torch.cuda.synchronize()
            want = cpu.dispatch(list(x.cpu()), list(idx.cpu()), list(w.cpu()))
            want_combined = cpu.combine([t.clone() for t in want.tokens], want.handle)
            checks += 1
            same = all(torch.equal(combined[r].cpu().view(torch.int16), want_combined[r].view(torch.int16)) for r in range(R))
            same = same and out.expert_counts.cpu().tolist() == [want.layout[r].expert_counters for r in range(R)]
            mismatches += 0 if same else 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gpu.check()
    free_after, _ = torch.cuda.mem_get_info(device)
    grown = free_before - free_after
    print(f"soak: {args.replays} replays in {seconds:.1f} s ({seconds / args.replays * 1e6:.1f} µs each, routing copy "
          f"included), {checks} checked against the CPU, {mismatches} mismatched; device memory in use grew by {grown} bytes")
    sys.exit(0 if mismatches == 0 and grown <= 0 else 1)


if __name__ == "__main__":
    main()
