"""Where a Python call's host time goes, on a GPU machine: the package's dispatch and combine
timed from Python, and inside them the C library's calls timed around their ctypes calls;
medians in µs. Stacked [R, B, ...] arrays take the stacked calls (epGroupDispatchStacked, which
includes the update, and epGroupCombineStacked); per-rank lists (--lists) the per-rank ones
(epGroupUpdateAll, epGroupDispatchAll, epGroupCombineAll). What is left of the Python time
beside the C calls is the package's own. Not a test: a measurement for the host-cost work.

    EP_LIBRARY=/path/libexpert_parallel.so PYTHONPATH=python python3 scripts/host-cost.py
"""
import argparse
import statistics
import time

import torch

from expert_parallel import VirtualGroup
from expert_parallel.bench import CASES, _Inputs


def timed(fn, samples):
    def run(*arguments):
        start = time.perf_counter()
        result = fn(*arguments)
        samples.append(time.perf_counter() - start)
        return result
    return run


def measure(name, ranks, calls, lists):
    algorithm, tokens, hidden, top_k, experts, _ = CASES[name]
    group = VirtualGroup(ranks=ranks, experts=experts, hidden=hidden, top_k=top_k, max_tokens=tokens, algorithm=algorithm,
                         dtype="bf16", device="cuda:0")
    inputs = _Inputs(CASES[name], ranks, "cuda", 1)
    arguments = (inputs.x, inputs.idx, inputs.w) if lists else inputs.stacked
    c = {"update": [], "dispatch": [], "combine": []}
    if lists:
        group._fn_update = timed(group._fn_update, c["update"])
        group._fn_dispatch = timed(group._fn_dispatch, c["dispatch"])
        group._fn_combine = timed(group._fn_combine, c["combine"])
    else:
        group._fn_dispatch_stacked = timed(group._fn_dispatch_stacked, c["dispatch"])
        group._fn_combine_stacked = timed(group._fn_combine_stacked, c["combine"])
    dispatch, combine = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        out = group.dispatch(*arguments)
        t1 = time.perf_counter()
        group.combine(out.received if not lists else out.tokens, out.handle)
        dispatch.append(t1 - t0)
        combine.append(time.perf_counter() - t1)
    torch.cuda.synchronize()
    group.check()
    med = lambda values: statistics.median(values[calls // 10:]) * 1e6 if values else float("nan")  # noqa: E731
    kind = "per-rank lists" if lists else "stacked"
    inside = (f"C update {med(c['update']):.1f} dispatch {med(c['dispatch']):.1f}" if lists
              else f"C update+dispatch {med(c['dispatch']):.1f}")
    print(f"{name} R={ranks} {kind}: Python dispatch {med(dispatch):.1f} combine {med(combine):.1f} | "
          f"{inside} combine {med(c['combine']):.1f}", flush=True)
    group.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--case", action="append", help="NAME:RANKS (default ll-std:1, ll-1:8, ll-std:8)")
    parser.add_argument("--lists", action="store_true", help="also time per-rank lists (the per-rank calls)")
    args = parser.parse_args()
    for spec in args.case or ["ll-std:1", "ll-1:8", "ll-std:8"]:
        name, ranks = spec.split(":")
        measure(name, int(ranks), args.calls, lists=False)
        if args.lists:
            measure(name, int(ranks), args.calls, lists=True)
