"""One rank of the NCCL-rank test (python/tests/test_nccl.py starts two with torchrun):
torch.distributed over NCCL, an ep.NCCLGroup built from the process group, LL and HT steps in
every layout, compared bit for bit with the CPU backend run here for all ranks on the same inputs
(every rank generates every rank's inputs from one seed). Prints "rank R ok: ..." on success,
"rank R FAILED: ..." lines otherwise (and exits 1)."""

import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import expert_parallel as ep  # noqa: E402
from reference import random_routing  # noqa: E402

# (algorithm, layout, alignment, experts, top_k, hidden, max_tokens)
CASES = [
    ("ll", "expert_major", 1, 8, 3, 64, 16),
    ("ll", "rank_major", 1, 8, 3, 64, 16),
    ("ht", "flat", 1, 8, 3, 64, 24),
    ("ht", "expert_major_padded", 1, 8, 3, 64, 24),
    ("ht", "expert_major_padded", 16, 16, 4, 128, 24),
]
DTYPES = ["bf16", "f32"]
STEPS = 4  # forward, backward, forward, backward; index dtypes alternate
TORCH_DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
# Seconds a rank waits for another on the device: room for one rank compiling a kernel (NVRTC, on
# first use) while the other already waits in it.
TIMEOUT = 30.0


def make_step(seed, ranks, experts, top_k, hidden, max_tokens, dtype, recv_shape, recv_routing_shape, index_dtype):
    """Every rank's inputs of one step as CPU tensors: tokens, routing, weights, expert outputs
    and (HT backward) weight gradients."""
    rng = np.random.default_rng(seed)
    tokens = [int(rng.integers(0, max_tokens + 1)) for _ in range(ranks)]
    tokens[seed % ranks] = max_tokens  # one full rank each step
    rate = 0.3 if seed % 3 == 0 else 0.05
    idx = [torch.from_numpy(random_routing(rng, b, experts, top_k, rate)).to(index_dtype) for b in tokens]
    element = TORCH_DTYPES[dtype]
    xs = [(torch.from_numpy(rng.standard_normal((b, hidden)).astype(np.float32)) * 3).to(element) for b in tokens]
    weights = [torch.from_numpy(rng.random((b, top_k)).astype(np.float32)) for b in tokens]
    ys = [(torch.from_numpy(rng.standard_normal(recv_shape).astype(np.float32)) * 3).to(element) for _ in range(ranks)]
    grads = [torch.from_numpy(rng.standard_normal(recv_routing_shape or (1,)).astype(np.float32)) for _ in range(ranks)]
    return xs, idx, weights, ys, grads


def same_bits(a, b):
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def compare(label, rank, nccl, cpu, failures):
    (nout, ncombined, ngrads), (cout, ccombined, cgrads) = nccl, cpu
    checks = [("received rows", nout.tokens, cout.tokens[rank]), ("combined rows", ncombined, ccombined[rank])]
    if cout.topk_idx is not None:
        checks += [("received topk_idx", nout.topk_idx, cout.topk_idx[rank]),
                   ("received weights", nout.topk_weights, cout.topk_weights[rank])]
    if cgrads is not None:
        checks.append(("weight gradients", ngrads, cgrads[rank]))
    for what, got, expected in checks:
        if not same_bits(got, expected):
            failures.append(f"{label}: {what} differ from the CPU backend")
    if nout.layout != cout.layout[rank]:
        failures.append(f"{label}: layout {nout.layout} != CPU {cout.layout[rank]}")


def run_cpu(group, xs, idx, weights, ys, grads, direction):
    out = group.dispatch(xs, idx, weights)
    if direction == "backward" and group.algorithm == "ht":
        combined, weight_grads = group.combine(ys, out.handle, direction=direction, weight_gradients=grads)
    else:
        combined, weight_grads = group.combine(ys, out.handle, direction=direction), None
    return out, combined, weight_grads


def run_nccl(group, x, idx, weights, y, grad, direction):
    device = torch.device("cuda", torch.cuda.current_device())
    out = group.dispatch(x.to(device), idx.to(device), weights.to(device))
    if direction == "backward" and group.algorithm == "ht":
        combined, weight_grads = group.combine(y.to(device), out.handle, direction=direction,
                                               weight_gradients=grad.to(device))
    else:
        combined, weight_grads = group.combine(y.to(device), out.handle, direction=direction), None
    group.check()
    return out, combined, weight_grads


def run_case(case, dtype, rank, ranks, failures):
    algorithm, layout, alignment, experts, top_k, hidden, max_tokens = case
    settings = dict(experts=experts, hidden=hidden, top_k=top_k, max_tokens=max_tokens, algorithm=algorithm,
                    layout=layout, alignment=alignment, dtype=dtype, timeout=TIMEOUT)
    group = ep.NCCLGroup.from_process_group(**settings)
    cpu = ep.VirtualGroup(ranks=ranks, device="cpu", **settings)
    assert (group.recv_shape, group.recv_routing_shape) == (cpu.recv_shape, cpu.recv_routing_shape)
    steps = 0
    try:
        for step in range(STEPS):
            seed = 1000 * CASES.index(case) + 100 * DTYPES.index(dtype) + step
            direction = "backward" if step % 2 else "forward"
            index_dtype = torch.int64 if step == 2 else torch.int32
            xs, idx, w, ys, grads = make_step(seed, ranks, experts, top_k, hidden, max_tokens, dtype, cpu.recv_shape,
                                              cpu.recv_routing_shape, index_dtype)
            label = f"{algorithm} {layout}({alignment}) {dtype} step {step} {direction} seed {seed}"
            expected = run_cpu(cpu, xs, idx, w, ys, grads, direction)
            got = run_nccl(group, xs[rank], idx[rank], w[rank], ys[rank], grads[rank], direction)
            compare(label, rank, got, expected, failures)
            steps += 1
    finally:
        group.close()
    return steps


def check_arguments(rank, failures):
    """Wrong arguments raise named errors before any rank moves a row (every rank runs the same
    checks, so the ranks stay in step)."""
    group = ep.NCCLGroup.from_process_group(experts=8, hidden=64, top_k=2, max_tokens=4, dtype="bf16", timeout=TIMEOUT)
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.zeros((2, 64), dtype=torch.bfloat16, device=device)
    idx = torch.tensor([[0, 5], [1, -1]], dtype=torch.int32, device=device)
    w = torch.ones((2, 2), dtype=torch.float32, device=device)
    expectations = [
        (lambda: group.dispatch(x.cpu(), idx, w), ep.InvalidArgumentError, "x: on cpu; must be on cuda"),
        (lambda: group.dispatch(x.float(), idx, w), ep.InvalidArgumentError, "x: dtype torch.float32; must be bf16"),
        (lambda: group.dispatch(x, idx.float(), w), ep.InvalidArgumentError, "topk_idx: dtype torch.float32"),
        (lambda: group.dispatch(x[:1], idx, w), ep.InvalidArgumentError, r"x: shape [1, 64]; must be [2, 64]"),
        (lambda: group.update(torch.zeros((5, 2), dtype=torch.int32, device=device)), ep.InvalidArgumentError,
         "topk_idx: 5 tokens; must be ≤ max_tokens (4)"),
        (lambda: group.dispatch([x], idx, w), ep.InvalidArgumentError,
         "x: a list; an NCCL group takes CUDA torch tensors"),
    ]
    try:
        for call, cls, fragment in expectations:
            try:
                call()
                failures.append(f"arguments: expected {cls.__name__} containing {fragment!r}, nothing raised")
            except cls as error:
                if fragment not in str(error):
                    failures.append(f"arguments: {cls.__name__} {str(error)!r} lacks {fragment!r}")
        out = group.dispatch(x, idx, w)
        group.update(idx)  # a new step: the old handle is void
        try:
            group.combine(out.tokens, out.handle)
            failures.append("arguments: combine with a handle of an earlier step raised nothing")
        except ep.InvalidUsageError:
            pass
        out = group.dispatch(x, None, w)  # the routing of the last update
        group.combine(out.tokens, out.handle)
        group.check()
        if group.active_ranks != list(range(group.ranks)):
            failures.append(f"arguments: active ranks {group.active_ranks}")
    finally:
        group.close()


def main():
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, ranks = dist.get_rank(), dist.get_world_size()
    failures, steps = [], 0
    try:
        for case in CASES:
            for dtype in DTYPES:
                steps += run_case(case, dtype, rank, ranks, failures)
        check_arguments(rank, failures)
    except Exception:
        failures.append("exception:\n" + traceback.format_exc())
    for failure in failures:
        print(f"rank {rank} FAILED: {failure}", flush=True)
    if not failures:
        print(f"rank {rank} ok: {steps} steps in {len(CASES) * len(DTYPES)} configurations match the CPU backend",
              flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
