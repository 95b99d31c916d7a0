"""One rank of the NCCL-rank test (python/tests/test_nccl.py starts two with torchrun):
torch.distributed over NCCL, an ep.NCCLGroup built from the process group, LL and HT steps in
every layout, compared bit for bit with the CPU backend run here for all ranks on the same inputs
(every rank generates every rank's inputs from one seed); then the autograd ops
(expert_parallel.torch.Exchange over the NCCLGroup) against Exchange over the CPU backend's
VirtualGroup of every rank, and DeepEP's flows through compat.deep_ep.Buffer on the process group
against the plain-PyTorch reference. Prints "rank R ok: ..." on success, "rank R FAILED: ..."
lines otherwise (and exits 1)."""

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import deep_ep_flows as flows  # noqa: E402
import deep_ep_reference as deep_ref  # noqa: E402
import expert_parallel as ep  # noqa: E402
from expert_parallel.compat.deep_ep import Buffer  # noqa: E402
from expert_parallel.torch import Exchange  # noqa: E402
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


# The autograd ops over an NCCL rank: the layouts they take there, and whether topk_weights get
# gradients (LL rank-major's are at the receiving ranks: refused).
AUTOGRAD_CASES = [("ht", "flat", 1, True), ("ht", "expert_major_padded", 4, True), ("ll", "rank_major", 1, False)]


def experts_of(sent, layout):
    """Elementwise stand-ins for the experts (the same bits on any device), shaped like the
    received rows; flat and rank-major rows weighted by their received weights, summed in order."""
    rows = sent.tokens.float()
    y = rows * 1.5 + rows.square() * 0.25
    if layout in ("flat", "rank_major"):
        w = sent.topk_weights
        total = w[..., 0]
        for c in range(1, w.shape[-1]):
            total = total + w[..., c]
        y = y * total.unsqueeze(-1)
    return y.to(sent.tokens.dtype)


def run_autograd(rank, ranks, failures):
    """Exchange over this rank's NCCLGroup against Exchange over the CPU VirtualGroup of every
    rank: two layers' forward, then one backward pass. Received and combined rows and x's
    gradients bit for bit (the library and the elementwise experts round the same everywhere);
    topk_weights' gradients within 1e-5 (torch's sums over the hidden size run in another order
    on the GPU). A failed check is recorded and the run goes on, so every rank makes the same calls."""
    for case in AUTOGRAD_CASES:
        for dtype in DTYPES:
            _autograd_case(rank, ranks, case, dtype, failures)
    return len(AUTOGRAD_CASES) * len(DTYPES)


def _autograd_case(rank, ranks, case, dtype, failures):
    """One configuration of run_autograd. Its steps' tokens die when it returns, on every rank
    at the same point: the group's collective teardown waits for its last step."""
    algorithm, layout, alignment, weights_grad = case
    device = torch.device("cuda", torch.cuda.current_device())
    settings = dict(experts=4 * ranks, hidden=64, top_k=3, max_tokens=12, algorithm=algorithm, layout=layout,
                    alignment=alignment, dtype=dtype, timeout=TIMEOUT)
    label = f"autograd {algorithm} {layout} {dtype}"
    group, cpu = ep.NCCLGroup.from_process_group(**settings), ep.VirtualGroup(ranks=ranks, device="cpu", **settings)
    on_rank, on_cpu = Exchange(group), Exchange(cpu)

    def differ(what, got, expected, exact=True):
        same = same_bits(got, expected) if exact else torch.allclose(got.cpu(), expected, rtol=1e-5, atol=1e-6)
        if not same:
            failures.append(f"{label}: {what} differ from the CPU backend")

    try:
        leaves, loss_rank, loss_cpu = [], 0, 0
        for layer in range(2):
            rng = np.random.default_rng(7000 + 10 * layer + AUTOGRAD_CASES.index(case))
            b = settings["max_tokens"]   # every rank's B (a stacked VirtualGroup call): fewer tokens as -1 rows
            idx = torch.stack([torch.from_numpy(random_routing(rng, b, settings["experts"], 3, 0.2)) for _ in range(ranks)]).long()
            x = (torch.from_numpy(rng.standard_normal((ranks, b, 64)).astype(np.float32)) * 2).to(TORCH_DTYPES[dtype])
            w = torch.from_numpy(rng.random((ranks, b, 3)).astype(np.float32))
            xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_(weights_grad)
            xr = x[rank].to(device).requires_grad_()
            wr = w[rank].to(device).requires_grad_(weights_grad)
            sent_rank, sent_cpu = on_rank.dispatch(xr, idx[rank].to(device), wr), on_cpu.dispatch(xc, idx, wc)
            # The received rows whole: zeros outside the zones on both (zero_fill; the slots copied out and cleared).
            differ(f"layer {layer}: received rows", sent_rank.tokens, sent_cpu.tokens[rank])
            y_rank = on_rank.combine(experts_of(sent_rank, layout), sent_rank)
            y_cpu = on_cpu.combine(experts_of(sent_cpu, layout), sent_cpu)
            differ(f"layer {layer}: combined rows", y_rank, y_cpu[rank])
            loss_rank = loss_rank + y_rank.float().square().sum() * (layer + 1)
            loss_cpu = loss_cpu + y_cpu.float().square().sum() * (layer + 1)
            leaves.append((xr, wr, xc, wc))
        loss_rank.backward()   # every rank's backward pass: the backward calls are collective
        loss_cpu.backward()
        for layer, (xr, wr, xc, wc) in enumerate(leaves):
            differ(f"layer {layer}: x's gradients", xr.grad, xc.grad[rank])
            if weights_grad:
                differ(f"layer {layer}: topk_weights' gradients", wr.grad, wc.grad[rank], exact=False)
        group.check()
    finally:
        on_rank.close()
        on_cpu.close()
        group.close()
        cpu.close()


def run_deep_ep(rank, ranks, failures):
    """DeepEP's intranode and low-latency flows through compat.deep_ep.Buffer on the default
    process group (an NCCLGroup underneath), this rank's results against the reference, and its
    FP8 low-latency dispatch behind a hook (the peers' scales arrive with their rows) against
    the CPU backend's. Every flow runs on every rank whatever an earlier check found."""
    experts, hidden, top_k = 4 * ranks, 128, 3
    tokens = [6 + 3 * (r % 3) for r in range(ranks)]
    tokens[-1] = 0   # a rank with nothing to send
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 24, num_rdma_bytes=0, timeout=TIMEOUT)
    cpu = Buffer.virtual(ranks, device="cpu", timeout=TIMEOUT)
    flows_run = 0

    def checked(what, check):
        try:
            check()
        except AssertionError as error:
            failures.append(f"deep_ep {what}: {error}")

    try:
        xs, idx, ws = deep_ref.make_inputs(31, tokens, experts, hidden, top_k)
        for async_finish in (False, True):
            results = flows.intranode([buffer], xs, idx, ws, experts, alignment=4, async_finish=async_finish)
            torch.cuda.synchronize()
            checked(f"intranode async_finish={async_finish}",
                    lambda: flows.check_intranode(results, xs, idx, ws, experts, alignment=4, only=rank))
            flows_run += 1
        xs, idx, ws = deep_ref.make_inputs(32, [min(t, 8) for t in tokens], experts, hidden, top_k)
        for hook in (True, False):
            results = flows.low_latency([buffer], xs, idx, ws, experts, max_tokens=8, hook=hook, async_finish=hook)
            torch.cuda.synchronize()
            checked(f"low latency hook={hook}", lambda: flows.check_low_latency(results, xs, idx, ws, experts, 8, only=rank))
            flows_run += 1
        xs, idx, _ = deep_ref.make_inputs(33, [min(t, 8) for t in tokens], experts, hidden, top_k)
        xs = [x.float().mul(torch.linspace(0.01, 30, hidden)).bfloat16() for x in xs]

        def fp8(b):
            device = b.device
            (codes, scales), count, _, _, receive = b.low_latency_dispatch(
                xs[b.rank].to(device), idx[b.rank].to(device), 8, experts, round_scale=True, return_recv_hook=True)
            receive()
            return flows.cpu(codes.view(torch.uint8)), flows.cpu(scales.contiguous()), flows.cpu(count)

        got, want = fp8(buffer), flows.on_ranks(cpu, fp8)[rank]

        def same_fp8():
            assert torch.equal(got[2], want[2]), "counts"
            for e, c in enumerate(want[2].tolist()):   # rows past the counts are unspecified
                assert torch.equal(got[0][e, :c], want[0][e, :c]), f"expert {e}: e4m3 rows"
                assert torch.equal(got[1][e, :c], want[1][e, :c]), f"expert {e}: scales"

        checked("FP8 low latency behind a hook", same_fp8)
        flows_run += 1
    finally:
        buffer.destroy()
        for b in cpu:
            b.destroy()
    return flows_run


def main():
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    # A bounded wait for the process group's own collectives (the groups' unique ids): a rank that
    # stopped early fails the others in two minutes, not torch's default ten.
    dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timedelta(seconds=120))
    rank, ranks = dist.get_rank(), dist.get_world_size()
    failures, steps = [], 0
    try:
        for case in CASES:
            for dtype in DTYPES:
                steps += run_case(case, dtype, rank, ranks, failures)
        check_arguments(rank, failures)
        steps += run_autograd(rank, ranks, failures)
        steps += run_deep_ep(rank, ranks, failures)
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
