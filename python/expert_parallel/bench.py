"""The Python benchmark: what a framework pays per call through this package.

    python -m expert_parallel.bench --device cuda:0 --engine-json ep-bench.json --json py.json
    python -m expert_parallel.bench --device cpu --case tiny          # the CPU backend, small

For each case (the standard cases of docs/ep-bench.md, or the small ``tiny`` / ``tiny-ht``) it runs
dispatch then combine through a ``VirtualGroup`` (``--nccl``: this process's ``NCCLGroup`` of one
rank on the GPU, or under torchrun its rank of a group over every process, each rank timing its own
calls, rank 0 printing every rank's row; ``--deepep``: DeepEP's calls through ``compat.deep_ep.Buffer`` at one rank;
``--exchange``: the autograd ops of ``expert_parallel.torch``) with identity experts and reports,
per call, medians of:

- host: wall clock of the Python call (what the framework's CPU thread pays);
- gpu: what the GPU spends on the call: CUDA events around it on the current stream, measured in a
  second loop whose calls queue up behind a held stream (as ep-bench does), so that the host's time
  to issue them does not count (CUDA only);
- engine: ep-bench's figures for the same case and ranks, read from its ``--json`` output
  (run ``ep-bench run --backend gpu --json PATH`` in the same session); dispatch is update +
  dispatch there, as the package's dispatch (given ``topk_idx``) runs both;
- baseline: what a user would write instead with plain tensors on the same device: argsort the
  selections by expert, ``index_select`` the rows (dispatch), ``index_select`` them back, multiply
  by the weights and sum over k (combine). PyTorch where it is installed, NumPy otherwise.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from .group import VirtualGroup

# name: (algorithm, tokens per rank, hidden, top-k, experts, ranks)
CASES: Dict[str, tuple] = {
    "ll-std": ("ll", 128, 7168, 8, 256, 8),
    "ll-32": ("ll", 32, 7168, 8, 256, 8),
    "ll-1": ("ll", 1, 7168, 8, 256, 8),
    "ht-std": ("ht", 4096, 7168, 8, 256, 8),
    "ht-4k": ("ht", 4096, 4096, 8, 256, 8),
    "odd": ("ll", 77, 2880, 10, 96, 6),
    "tiny": ("ll", 8, 64, 2, 8, 2),
    "tiny-ht": ("ht", 16, 64, 3, 8, 2),
}


def _median_us(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e6


class _Inputs:
    """One step's per-rank tokens, routing and weights: top-k distinct experts per token drawn
    uniformly, weights in (0, 1), as ep-bench's standard cases do."""

    def __init__(self, case: tuple, ranks: int, device: str, seed: int, keep: Optional[int] = None) -> None:
        """`keep`: only that rank's arrays (an NCCL rank's own, drawn as for every rank)."""
        import numpy as np

        algorithm, tokens, hidden, top_k, experts, _ = case
        rng = np.random.default_rng(seed)
        self.idx = [np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k].astype(np.int32) for _ in range(ranks)]
        self.w = [rng.random((tokens, top_k), dtype=np.float32) for _ in range(ranks)]
        self.x = [rng.standard_normal((tokens, hidden), dtype=np.float32) for _ in range(ranks)]
        if keep is not None:
            self.idx, self.w, self.x = [self.idx[keep]], [self.w[keep]], [self.x[keep]]
        self.cuda = device != "cpu"
        if self.cuda:
            import torch

            self.idx = [torch.from_numpy(a).to(device) for a in self.idx]
            self.w = [torch.from_numpy(a).to(device) for a in self.w]
            self.x = [torch.from_numpy(a).to(device=device, dtype=torch.bfloat16) for a in self.x]
        # The package's fast path: every rank's arrays stacked into one [R, B, ...] array.
        if self.cuda:
            self.stacked = (torch.stack(self.x), torch.stack(self.idx), torch.stack(self.w))
        else:
            self.stacked = (np.stack(self.x), np.stack(self.idx), np.stack(self.w))


def group_of(case: tuple, ranks: int, device: str, nccl: bool = False, dtype: Optional[str] = None,
             tuning: Optional[dict] = None) -> Any:
    """The group a measurement of `case` calls: a VirtualGroup of `ranks`, or (`nccl`) this
    process's rank of an NCCL group: of one, or of every process of torch.distributed's default
    group where it is initialised with `ranks` processes (what a torchrun job's rank calls);
    `dtype` defaults to f32 on the CPU, bf16 on a GPU; `tuning` as the groups take it (GPU only)."""
    algorithm, tokens, hidden, top_k, experts, _ = case
    shape = dict(experts=experts, hidden=hidden, top_k=top_k, max_tokens=tokens, algorithm=algorithm,
                 dtype=dtype or ("f32" if device == "cpu" else "bf16"))
    if tuning:
        shape["tuning"] = tuning
    if nccl:
        from .nccl_group import NCCLGroup, nccl_unique_id

        if ranks > 1:   # this process's rank of the torchrun job (torch.distributed is initialised: main())
            return NCCLGroup.from_process_group(device=device, **shape)
        return NCCLGroup(rank=0, ranks=1, unique_id=nccl_unique_id(), device=device, **shape)
    return VirtualGroup(ranks=ranks, device=device, **shape)


def _time_package(case: tuple, ranks: int, device: str, iterations: int, warmup: int, inputs: _Inputs,
                  nccl: bool = False, barrier: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    group = group_of(case, ranks, device, nccl)
    arguments = tuple(t[0] for t in inputs.stacked) if nccl else inputs.stacked

    def expert_outputs(out):   # identity experts: the received rows come back (NCCL: from the slot's own buffer)
        return out.expert_outputs if nccl else out.received

    result = _time_calls(lambda: group.dispatch(*arguments), lambda out: group.combine(expert_outputs(out), out.handle),
                         iterations, warmup, inputs.cuda, barrier=barrier)
    group.check()
    group.close()
    return result


def _time_exchange(case: tuple, ranks: int, device: str, iterations: int, warmup: int, inputs: _Inputs,
                   zero_fill: bool = True) -> Dict[str, Any]:
    """The autograd ops (``expert_parallel.torch.Exchange`` over a VirtualGroup): forward dispatch
    and combine, each a fresh output tensor (zero-filled receive buffers unless `zero_fill` is
    False), what a training step calls per MoE layer."""
    import torch

    from .torch import Exchange

    group = group_of(case, ranks, device)
    exchange = Exchange(group, zero_fill=zero_fill)
    x, idx, w = (t if isinstance(t, torch.Tensor) else torch.from_numpy(t) for t in inputs.stacked)
    # identity experts: the received rows come back
    result = _time_calls(lambda: exchange.dispatch(x, idx, w), lambda sent: exchange.combine(sent.tokens, sent),
                         iterations, warmup, inputs.cuda)
    exchange.close()
    group.check()
    group.close()
    return result


def _time_deepep(case: tuple, device: str, iterations: int, warmup: int, inputs: _Inputs) -> Dict[str, Any]:
    """DeepEP's calls through ``compat.deep_ep.Buffer`` at one rank (a torch.distributed group of
    one: an NCCLGroup on CUDA, what a torchrun rank that switched from DeepEP calls): LL cases
    ``low_latency_dispatch`` / ``low_latency_combine``; HT cases ``get_dispatch_layout`` +
    ``dispatch`` (which waits for the received counts, as DeepEP's does) / ``combine``."""
    import tempfile

    import torch
    import torch.distributed as dist

    from .compat.deep_ep import Buffer

    algorithm, tokens, _, _, experts, _ = case
    x, idx, w = inputs.x[0], inputs.idx[0], inputs.w[0]
    if not isinstance(x, torch.Tensor):   # the CPU backend: f32 tensors
        x, idx, w = (torch.from_numpy(a) for a in (x, idx, w))
    idx = idx.long()
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
        try:
            buffer = Buffer(dist.group.WORLD, low_latency_mode=algorithm == "ll", device=device, max_tokens_per_rank=tokens)

            def dispatch():
                if algorithm == "ll":
                    return buffer.low_latency_dispatch(x, idx, tokens, experts, use_fp8=False)
                per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, experts)
                return buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                       num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)

            def combine(out):   # identity experts: the received rows come back
                if algorithm == "ll":
                    return buffer.low_latency_combine(out[0], idx, w, out[2])
                return buffer.combine(out[0], out[4], topk_weights=out[2])

            return _time_calls(dispatch, combine, iterations, warmup, inputs.cuda, hold=algorithm == "ll")
        finally:
            dist.destroy_process_group()


def _time_calls(dispatch, combine, iterations: int, warmup: int, cuda: bool, hold: bool = True,
                barrier: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    """Medians of `dispatch()` then `combine(its result)`: host wall clock per call and (`cuda`)
    CUDA events around each on the current stream, the calls queued behind a held stream
    (`hold`; a call that waits for the GPU cannot be, and is timed as it comes). Where the hold
    ran out before the calls were all enqueued, the GPU times are the host's pace: the result
    says ``host_paced`` and a warning goes to stderr. `barrier`: the ranks of a job meet before
    the hold, so that theirs start together (their calls wait for each other on the GPU)."""
    host_d: List[float] = []
    host_c: List[float] = []
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        out = dispatch()
        t1 = time.perf_counter()
        combine(out)
        t2 = time.perf_counter()
        if i >= warmup:
            host_d.append(t1 - t0)
            host_c.append(t2 - t1)
    result: Dict[str, Any] = {"host_dispatch_us": _median_us(host_d), "host_combine_us": _median_us(host_c)}
    if cuda:
        import torch

        torch.cuda.synchronize()
        if barrier is not None:
            barrier()
        # The GPU's own time: every call queues up behind a held stream (about 0.5 ms of GPU
        # sleep per call, far more than the host needs to issue one), then runs back to back.
        marks = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(iterations)]
        held = torch.cuda.Event()
        if hold:
            torch.cuda._sleep(1_000_000 * iterations)
            held.record()
        for m in marks:
            m[0].record()
            out = dispatch()
            m[1].record()
            combine(out)
            m[2].record()
        if hold and held.query():   # the hold was over before the last call was enqueued
            result["host_paced"] = True
            print("expert_parallel.bench: the stream's hold ran out before the calls were enqueued; the GPU times "
                  "are the host's pace", file=sys.stderr)
        torch.cuda.synchronize()
        result["gpu_dispatch_us"] = statistics.median(m[0].elapsed_time(m[1]) for m in marks) * 1e3
        result["gpu_combine_us"] = statistics.median(m[1].elapsed_time(m[2]) for m in marks) * 1e3
    return result


def _time_baseline(case: tuple, iterations: int, warmup: int, inputs: _Inputs) -> Dict[str, Any]:
    """Plain tensors: all ranks' tokens as one batch, sorted by expert, gathered and scattered back."""
    top_k = case[3]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        import numpy as np

        x, idx, w = np.concatenate(inputs.x), np.concatenate(inputs.idx).reshape(-1), np.concatenate(inputs.w)
        dispatch_s, combine_s = [], []
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            order = np.argsort(idx, kind="stable")
            rows = np.take(x, order // top_k, axis=0)
            t1 = time.perf_counter()
            back = np.empty_like(rows)
            back[order] = rows
            y = (back.reshape(x.shape[0], top_k, -1) * w[:, :, None]).sum(axis=1)
            t2 = time.perf_counter()
            if i >= warmup:
                dispatch_s.append(t1 - t0)
                combine_s.append(t2 - t1)
        del y
        return {"baseline": "numpy", "baseline_dispatch_us": _median_us(dispatch_s), "baseline_combine_us": _median_us(combine_s)}

    def as_torch(values):
        return torch.cat([v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for v in values])

    x, idx, w = as_torch(inputs.x), as_torch(inputs.idx).reshape(-1).long(), as_torch(inputs.w)
    cuda = x.is_cuda
    dispatch_s, combine_s = [], []
    if cuda:   # the GPU's own time, as for the package: the calls queue up behind a held stream
        torch.cuda.synchronize()
        torch.cuda._sleep(1_000_000 * (warmup + iterations))
    for i in range(warmup + iterations):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else None
        t0 = time.perf_counter()
        if marks:
            marks[0].record()
        order = torch.argsort(idx, stable=True)
        rows = x.index_select(0, order // top_k)
        if marks:
            marks[1].record()
        t1 = time.perf_counter()
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        back = rows.index_select(0, inverse).reshape(x.shape[0], top_k, -1)
        y = (back.float() * w[:, :, None]).sum(dim=1).to(x.dtype)
        if marks:
            marks[2].record()
        t2 = time.perf_counter()
        if i >= warmup:
            if marks:
                dispatch_s.append(marks)
            else:
                dispatch_s.append(t1 - t0)
                combine_s.append(t2 - t1)
    del y
    if cuda:
        torch.cuda.synchronize()
        return {"baseline": "torch",
                "baseline_dispatch_us": statistics.median(m[0].elapsed_time(m[1]) for m in dispatch_s) * 1e3,
                "baseline_combine_us": statistics.median(m[1].elapsed_time(m[2]) for m in dispatch_s) * 1e3}
    return {"baseline": "torch", "baseline_dispatch_us": _median_us(dispatch_s), "baseline_combine_us": _median_us(combine_s)}


def _engine_figures(path: Optional[str], nccl: bool = False, rank: int = 0) -> Dict[tuple, Dict[str, float]]:
    """ep-bench's JSON (a list of measurements) by (case, ranks): its virtual groups' entries, or
    (`nccl`) its NCCL ranks' (`--transport nccl`: one entry per rank, rank `rank`'s taken)."""
    if not path:
        return {}
    with open(path) as f:
        measurements = json.load(f)
    if not isinstance(measurements, list) or not all(isinstance(m, dict) for m in measurements):
        raise ValueError(f"a JSON {type(measurements).__name__}, not a list of objects")
    # Entries without a combine (u8 payloads: dispatch only) or in FP8 are not the package's cases.
    # The package's dispatch runs the step's update too: its engine figure is the one-call update +
    # dispatch where ep-bench timed it (one launch: LL), else update + dispatch.
    def dispatch(m):
        if isinstance(m.get("updateDispatch"), dict):
            return m["updateDispatch"]["median"]
        return m["dispatch"]["median"] + (m["update"]["median"] if isinstance(m.get("update"), dict) else 0.0)

    # Only runs of the package's case as it is: its algorithm (`odd` is LL here, ep-bench runs both
    # variants under that name), uniform routing, the case's shape and layout; several runs of a
    # case (device-verify's) give their median.
    def as_the_package_runs_it(m):
        if m.get("name") not in CASES:   # (custom: no case of the package's to compare)
            return True
        options = (m.get("run") or {}).get("options") or {}
        return (m.get("algorithm") in (None, CASES[m["name"]][0]) and float(options.get("skew") or 0) == 0
                and all(options.get(key) is None for key in ("tokens", "maxTokens", "hidden", "topK", "experts", "layout"))
                and not options.get("tokenCounts"))

    runs: Dict[tuple, List[tuple]] = {}
    for m in measurements:
        if (isinstance(m.get("combine"), dict) and not m.get("fp8") and as_the_package_runs_it(m)
                and (m.get("rank") == rank if nccl else m.get("rank") is None)):
            runs.setdefault((m["name"], m["ranks"]), []).append((dispatch(m), m["combine"]["median"]))
    return {key: {"engine_dispatch_us": statistics.median(d for d, _ in figures),
                  "engine_combine_us": statistics.median(c for _, c in figures)} for key, figures in runs.items()}


def run(names: Sequence[str], device: str, ranks: Optional[int], iterations: int, warmup: int, seed: int,
        engine_json: Optional[str], baseline: bool, nccl: bool = False, deepep: bool = False,
        exchange: Optional[str] = None, job: Optional[tuple] = None) -> List[Dict[str, Any]]:
    """`exchange`: None, or "zero-fill" / "no-fill" to time the autograd ops instead. `job`:
    (this process's rank, ranks) of a torchrun job (`nccl`): its rank of a group over them all,
    its own inputs (every rank draws the same step) and its entries of ep-bench's JSON."""
    rank, world = job or (0, 1)
    engine = _engine_figures(engine_json, nccl or (deepep and device != "cpu"), rank)
    results = []
    for name in names:
        case = CASES[name]
        r = world if nccl else 1 if deepep else ranks or case[5]
        row: Dict[str, Any] = {"case": name, "ranks": r, "device": device, "iterations": iterations,
                               "group": ("deep_ep.Buffer" if deepep else "NCCLGroup" if nccl else
                                         f"Exchange ({exchange})" if exchange else "VirtualGroup")}
        if job is not None:
            row["rank"] = rank
        # The same step for the package and the baseline (an NCCL rank's: its own part of it).
        inputs = _Inputs(case, r, device, seed, keep=rank if nccl else None)
        if deepep:
            row.update(_time_deepep(case, device, iterations, warmup, inputs))
        elif exchange:
            row.update(_time_exchange(case, r, device, iterations, warmup, inputs, exchange == "zero-fill"))
        else:
            row.update(_time_package(case, r, device, iterations, warmup, inputs, nccl, _job_barrier() if job else None))
        row.update(engine.get((name, r), {}))
        if baseline:
            row.update(_time_baseline(case, iterations, warmup, inputs))
        results.append(row)
    return results


def torchrun_job() -> Optional[tuple]:
    """(RANK, WORLD_SIZE) where this process is one of several ranks of a torchrun job (its
    environment), else None."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else None


def _job_barrier() -> Callable[[], Any]:
    """torch.distributed's barrier over the default group (a torchrun job's ranks)."""
    import torch.distributed as dist

    return dist.barrier


def _job_device(device: str) -> str:
    """A torchrun rank's CUDA device: `device` where it names one, else cuda:LOCAL_RANK."""
    import os

    return device if ":" in device else f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"


def _run_job(names: Sequence[str], device: str, iterations: int, warmup: int, seed: int, engine_json: Optional[str],
             baseline: bool, job: tuple) -> List[Dict[str, Any]]:
    """`run` as one rank of a torchrun job (--nccl): torch.distributed over gloo to share the
    NCCL unique id and gather the rows; every rank's rows on every rank, by case then rank."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    try:
        rows = run(names, device, None, iterations, warmup, seed, engine_json, baseline, nccl=True, job=job)
        gathered: List[Any] = [None] * job[1]
        dist.all_gather_object(gathered, rows)
    finally:
        if started:
            dist.destroy_process_group()
    return _by_case(gathered)


def _by_case(gathered: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Every rank's rows (`gathered[rank]`: its rows, one per case in order), by case then rank."""
    return [rows[i] for i in range(max(map(len, gathered), default=0)) for rows in gathered if i < len(rows)]


def render(results: List[Dict[str, Any]]) -> str:
    columns = [("case", "case"), ("ranks", "R")] + ([("rank", "rank")] if any("rank" in row for row in results) else []) + [
               ("host_dispatch_us", "host d µs"), ("host_combine_us", "host c µs"),
               ("gpu_dispatch_us", "gpu d µs"), ("gpu_combine_us", "gpu c µs"), ("engine_dispatch_us", "engine d µs"),
               ("engine_combine_us", "engine c µs"), ("baseline_dispatch_us", "baseline d µs"),
               ("baseline_combine_us", "baseline c µs")]

    def cell(row, key):
        value = row.get(key)
        return "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))

    table = [[title for _, title in columns]] + [[cell(row, key) for key, _ in columns] for row in results]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)) for line in table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import importlib.util

    if importlib.util.find_spec("numpy") is None:   # (the package's optional dependency; the inputs are drawn with it)
        print("python -m expert_parallel.bench: needs NumPy (pip install numpy, or pip install './python[numpy]')",
              file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m expert_parallel.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="case (repeatable); default: "
                        "the standard cases on CUDA, tiny and tiny-ht on the CPU")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--ranks", type=int, help="ranks of the group (default: the case's)")
    parser.add_argument("--nccl", action="store_true", help="time an NCCLGroup instead of a VirtualGroup: of one rank "
                        "(this process, one GPU: what each rank of a torchrun job calls), or under torchrun this process's "
                        "rank of a group over the job's ranks (--device cuda: cuda:LOCAL_RANK; rank 0 prints every rank's "
                        "rows; each rank's baseline is its own tokens, with no exchange); with --engine-json, ep-bench's "
                        "--transport nccl --ranks 1 (or N) figures of the same rank")
    parser.add_argument("--deepep", action="store_true", help="time DeepEP's calls through compat.deep_ep.Buffer at one "
                        "rank (a torch.distributed group of one: on CUDA an NCCLGroup, as a torchrun rank that switched "
                        "from DeepEP calls it; with --engine-json, ep-bench's --transport nccl --ranks 1 figures)")
    parser.add_argument("--exchange", choices=["zero-fill", "no-fill"], help="time the autograd ops (expert_parallel.torch."
                        "Exchange: forward dispatch and combine into fresh tensors) instead, with the receive buffers "
                        "zero-filled per call (the default of Exchange) or not (zero_fill=False)")
    parser.add_argument("--iterations", type=int, default=100, help="timed calls per case (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine-json", help="ep-bench --json output of the same run, shown beside")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-tensor baseline")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.iterations > 1_000_000:
        parser.error(f"--iterations {args.iterations}: must be in 1...1000000")
    if args.warmup < 0 or args.warmup > 1_000_000:
        parser.error(f"--warmup {args.warmup}: must be in 0...1000000")
    if args.ranks is not None and args.ranks < 1:
        parser.error(f"--ranks {args.ranks}: must be ≥ 1")
    if args.nccl and not args.device.startswith("cuda"):
        parser.error(f"--nccl: an NCCL group runs on a CUDA device; --device is {args.device!r}")
    job = torchrun_job() if args.nccl else None
    if args.nccl and args.ranks not in (None, 1 if job is None else job[1]):
        parser.error(f"--nccl --ranks {args.ranks}: the group is this process's one rank, or under torchrun the job's "
                     f"{1 if job is None else job[1]}; --ranks must be that (or left out)")
    if args.deepep and args.nccl:
        parser.error("--deepep --nccl: choose one (--deepep at one rank on CUDA is over an NCCLGroup already)")
    if args.exchange and (args.deepep or args.nccl):
        parser.error(f"--exchange with {'--deepep' if args.deepep else '--nccl'}: the autograd ops run over a VirtualGroup")
    if args.deepep and args.ranks not in (None, 1):
        parser.error(f"--deepep --ranks {args.ranks}: the Buffer is this process's one rank; --ranks must be 1 (or left out)")
    if args.device != "cpu" and not re.fullmatch(r"cuda(:[0-9]+)?", args.device):
        parser.error(f"--device {args.device!r}: must be cpu or cuda[:N]")
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: this PyTorch finds no CUDA device (torch.cuda.is_available() is False)")
    names = args.case or (["tiny", "tiny-ht"] if args.device == "cpu" else ["ll-std", "ll-32", "ll-1", "ht-std", "ht-4k", "odd"])
    if args.ranks is not None:
        for name in names:
            experts = CASES[name][4]
            if experts % args.ranks:
                parser.error(f"--ranks {args.ranks}: must divide case {name}'s {experts} experts")
    if args.seed < 0:   # (NumPy's generator takes non-negative seeds only)
        parser.error(f"--seed {args.seed}: must be ≥ 0")
    if args.engine_json is not None and not os.path.isfile(args.engine_json):
        parser.error(f"--engine-json {args.engine_json}: no such file")
    if args.engine_json is not None:   # read before the run: a file that is not ep-bench's failed after it
        try:
            _engine_figures(args.engine_json, args.nccl or (args.deepep and args.device != "cpu"), job[0] if job else 0)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as error:
            parser.error(f"--engine-json {args.engine_json}: not ep-bench's --json output (a list of measurements): "
                         f"{type(error).__name__}: {error}")
    if args.json is not None and os.path.isdir(args.json):   # (open() raised IsADirectoryError after the whole run)
        parser.error(f"--json {args.json}: a folder; must name the file to write (checked before the run)")
    if args.json is not None and not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK):
        parser.error(f"--json {args.json}: its folder does not exist or cannot be written (checked before the run)")
    if job is not None:
        results = _run_job(names, _job_device(args.device), args.iterations, args.warmup, args.seed, args.engine_json,
                           not args.no_baseline, job)
        if job[0] != 0:   # rank 0 reports every rank's rows
            return 0
    else:
        results = run(names, args.device, args.ranks, args.iterations, args.warmup, args.seed, args.engine_json,
                      not args.no_baseline, args.nccl, args.deepep, args.exchange)
    print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
