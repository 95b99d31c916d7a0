"""Where a Python call's host time goes, on a GPU machine: the package's dispatch and combine
timed from Python, and inside them the C library's calls timed around their ctypes calls;
medians in µs. Stacked [R, B, ...] arrays take the stacked calls (epGroupDispatchStacked, which
includes the update, and epGroupCombineStacked); per-rank lists (--lists) the per-rank ones
(epGroupUpdateAll, epGroupDispatchAll, epGroupCombineAll); --nccl adds an NCCLGroup of one rank
(the stacked calls with its one part: update and dispatch in one call; combine from the slot's
own expert-output buffer). What is left of the Python time beside the C calls is the package's own. Not a test: a measurement for the host-cost work.
`--tuning serial_launches=1` launches with cuLaunchKernel instead of cuLaunchKernelEx (the driver's host
cost of the two differs); `--tuning fused_update=0` keeps the update's own launch.

    EP_LIBRARY=/path/libexpert_parallel.so PYTHONPATH=python python3 scripts/host-cost.py

`--stub` replaces the C calls by a no-op that returns success: what is timed is then the
package's own Python alone (nothing is computed; the launch's host cost, which moves by process,
is out of the figure). With `--device cpu` that runs on any machine (CPU tensors take the same
in-line path); `--hidden` makes the CPU group's buffers smaller. The Python time does not depend
on it, but for `--exchange` the CPU allocator's does: each dispatch makes a fresh worst-case receive
buffer `[R, L, R*Bmax, H]`, and from 32 MiB (ll-std R = 8 at `--hidden 64`) glibc maps and unmaps it
every call (~15 µs on the build machine), which `--hidden 8` (4 MiB) leaves out and which a GPU's
caching allocator does not pay.

    PYTHONPATH=python python3 scripts/host-cost.py --device cpu --stub --hidden 64 --calls 20000

Where expert_parallel._torch_fast is built (scripts/build-torch-fast), the stacked calls are timed
twice in the same process: through it ("C++ reads": the package's common calls read their torch
tensors in C++ and make the C call from there, so no C time of their own is shown) and through the
package's Python path ("Python reads").

`--rotate N` takes the inputs and the expert outputs from N copies in turn, as a framework's new
tensors each step (their addresses change each call; the default, 1, gives the same tensors).

`--exchange` times `expert_parallel.torch.Exchange`'s dispatch and combine instead (stacked, under
`torch.no_grad()`, `zero_fill=False`; `--grad` with x and topk_weights requiring grad, the forward
calls only): the torch ops' path, fresh output tensors each call.

On a GPU the calls only enqueue work. Where a step's kernels take longer than its host calls
(ll-std at R = 8: ~100 µs of GPU a step against ~50 µs of host through Exchange), a long run fills
the driver's launch queue, and from then on each launch waits for the GPU: the figures are the GPU's
pace, not the host's. `--drain N` (default 25; 0: never) waits for the GPU, untimed, every N calls,
so that no more than N steps are queued, and prints how long those waits took per call (what the
GPU was behind the host; near 0 where the host is the slower side).
"""
import argparse
import statistics
import time

import numpy
import torch

from expert_parallel import _fast
from expert_parallel.bench import CASES, _Inputs, group_of


def timed(fn, samples):
    def run(*arguments):
        start = time.perf_counter()
        result = fn(*arguments)
        samples.append(time.perf_counter() - start)
        return result
    return run


def median_us(values, calls):
    """The median of `values` (seconds) past the first tenth of `calls` (warm-up), in µs; NaN for none."""
    kept = values[calls // 10:]
    return statistics.median(kept) * 1e6 if kept else float("nan")


class Drain:
    """Called before each timed call i: on a GPU, every `every` calls, waits for the device
    (untimed), so that the launch queue never fills; `waited`: the seconds spent waiting."""

    def __init__(self, device, every):
        self.every = every if str(device) != "cpu" else 0
        self.device = device   # (the group's: the current device, never set here, may be another GPU)
        self.waited = 0.0

    def __call__(self, i):
        if self.every and i % self.every == 0:
            start = time.perf_counter()
            torch.cuda.synchronize(self.device)
            self.waited += time.perf_counter() - start

    def note(self, calls):
        """The label's note of the waits, per call ("" where none were made)."""
        return f" | waited for the GPU {self.waited / calls * 1e6:.1f} µs a call (every {self.every})" if self.every else ""


def stubbed(fn):
    return lambda *arguments: 0   # epSuccess


def measure(name, ranks, calls, kind, device="cuda:0", stub=False, hidden=None, tuning=None, rotate=1, grad=False, drain=0,
            fast=False):
    """Times `calls` dispatches and combines of case `name` (kind: "stacked", "lists", "nccl" or "exchange");
    `fast`: the stacked calls through expert_parallel._torch_fast (else its Python path)."""
    algorithm, tokens, case_hidden, top_k, experts, _ = CASES[name]
    case = (algorithm, tokens, hidden or case_hidden, top_k, experts, _)
    group = group_of(case, ranks, device, nccl=kind == "nccl", dtype="bf16", tuning=tuning)
    inputs = _Inputs(case, ranks, "cpu", 1)   # NumPy arrays, as torch tensors on `device` below
    x = torch.from_numpy(numpy.stack(inputs.x)).to(device=device, dtype=torch.bfloat16)
    idx, w = (torch.from_numpy(numpy.stack(a)).to(device) for a in (inputs.idx, inputs.w))
    if kind == "exchange":
        return measure_exchange(name, ranks, calls, group, x, idx, w, stub, grad, Drain(device, drain))
    copies = [(x, idx, w)] + [tuple(t.clone() for t in (x, idx, w)) for _ in range(rotate - 1)]
    arguments = [{"stacked": (x, idx, w), "lists": tuple(list(t.unbind(0)) for t in (x, idx, w)), "nccl": (x[0], idx[0], w[0])}[kind]
                 for x, idx, w in copies]
    stacked = kind == "stacked"
    one_call = kind != "lists"   # stacked arrays, and an NCCL rank's one part: update and dispatch in one call
    entries = ("_fn_dispatch_stacked", "_fn_combine_stacked") if one_call else ("_fn_update", "_fn_dispatch", "_fn_combine")
    c = {"update": [], "dispatch": [], "combine": []}
    if stacked:   # the C++ reads call the library (or the module's no-op) themselves: no C time of their own below
        module = _fast.torch_fast_module()
        _fast.look(x, ())   # (torch's tensor type, as a first call learns it)
        addresses = ((module.noop_entry(),) * 2 if stub else
                     tuple(_fast.entry_address(getattr(group, entry)) for entry in entries)) if fast and module else None
        group._fast_spec = None if addresses is None else group._fast_spec_made(entries=addresses)
    for entry in entries:
        function = stubbed(getattr(group, entry)) if stub else getattr(group, entry)
        setattr(group, entry, timed(function, c[entry.split("_")[2]]))
    dispatch, combine, wait = [], [], Drain(device, drain)
    if rotate == 1:
        arguments = arguments[0]
        for i in range(calls):
            wait(i)
            t0 = time.perf_counter()
            out = group.dispatch(*arguments)
            t1 = time.perf_counter()
            group.combine(out.received if stacked else out.tokens if kind == "lists" else out.expert_outputs, out.handle)
            dispatch.append(t1 - t0)
            combine.append(time.perf_counter() - t1)
    else:   # (the same timed calls, each of the next copy; the expert outputs' copies made on the first dispatches)
        outputs = []
        for i in range(calls):
            wait(i)
            given = arguments[i % rotate]
            t0 = time.perf_counter()
            out = group.dispatch(*given)
            t1 = time.perf_counter()
            if len(outputs) < rotate:
                ys = out.received if stacked else out.tokens if kind == "lists" else out.expert_outputs
                outputs.append(ys.clone() if stacked or kind == "nccl" else [t.clone() for t in ys])
            ys, handle = outputs[i % len(outputs)], out.handle
            t2 = time.perf_counter()
            group.combine(ys, handle)
            dispatch.append(t1 - t0)
            combine.append(time.perf_counter() - t2)
    if device != "cpu":
        torch.cuda.synchronize(device)
    if not stub:
        group.check()
    med = lambda values: median_us(values, calls)  # noqa: E731
    label = ({"stacked": "stacked", "lists": "per-rank lists", "nccl": "NCCL rank"}[kind] + (", C stubbed" if stub else "")
             + (", C++ reads" if stacked and group._fast_spec is not None else ", Python reads" if stacked else "")
             + (f", {rotate} copies in turn" if rotate > 1 else "")
             + "".join(f", {key}={value}" for key, value in (tuning or {}).items()))
    inside = (f"C update+dispatch {med(c['dispatch']):.1f}" if one_call
              else f"C update {med(c['update']):.1f} dispatch {med(c['dispatch']):.1f}")
    print(f"{name} R={ranks} {label}: Python dispatch {med(dispatch):.1f} combine {med(combine):.1f} | "
          f"{inside} combine {med(c['combine']):.1f}{wait.note(calls)}", flush=True)
    group.close()


def measure_exchange(name, ranks, calls, group, x, idx, w, stub, grad, wait):
    """Times `calls` forward dispatches and combines through Exchange (the torch ops' path)."""
    from expert_parallel.torch import Exchange

    if stub:
        for entry in ("_fn_dispatch_stacked", "_fn_combine_stacked"):
            setattr(group, entry, stubbed(getattr(group, entry)))
    exchange = Exchange(group, zero_fill=False)
    if grad:
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    dispatch, combine = [], []
    with torch.enable_grad() if grad else torch.no_grad():
        for i in range(calls):
            wait(i)
            t0 = time.perf_counter()
            sent = exchange.dispatch(x, idx, w)
            t1 = time.perf_counter()
            exchange.combine(sent.tokens, sent)
            dispatch.append(t1 - t0)
            combine.append(time.perf_counter() - t1)
            del sent
    if group._device != -1:
        torch.cuda.synchronize(group._device)
    if not stub:
        group.check()
    med = lambda values: median_us(values, calls)  # noqa: E731
    label = "Exchange" + (", C stubbed" if stub else "") + (", with grad" if grad else ", no grad")
    print(f"{name} R={ranks} {label}: Python dispatch {med(dispatch):.1f} combine {med(combine):.1f}{wait.note(calls)}", flush=True)
    exchange.close()
    group.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--case", action="append", help="NAME:RANKS (default ll-std:1, ll-1:8, ll-std:8)")
    parser.add_argument("--lists", action="store_true", help="also time per-rank lists (the per-rank calls)")
    parser.add_argument("--device", default="cuda:0", help="the group's device (default cuda:0; cpu with --stub anywhere)")
    parser.add_argument("--stub", action="store_true", help="the C calls replaced by a no-op: the package's own Python time")
    parser.add_argument("--hidden", type=int, help="hidden size instead of the case's (smaller CPU buffers)")
    parser.add_argument("--rotate", type=int, default=1, metavar="N",
                        help="inputs and expert outputs from N copies in turn (new addresses each call, as a framework's tensors)")
    parser.add_argument("--nccl", action="store_true", help="also time an NCCLGroup of one rank (cases with R = 1; a GPU with NCCL)")
    parser.add_argument("--exchange", action="store_true", help="time expert_parallel.torch.Exchange's calls instead (the torch ops)")
    parser.add_argument("--drain", type=int, default=25, metavar="N",
                        help="on a GPU, wait for it (untimed) every N calls, so that the launch queue never fills (0: never)")
    parser.add_argument("--grad", action="store_true", help="with --exchange: x and topk_weights require grad")
    parser.add_argument("--tuning", action="append", default=[], metavar="KNOB=0|1",
                        help="a boolean tuning knob of the groups (serial_launches=1: plain cuLaunchKernel launches; "
                             "fused_update=0: the update's own launch); repeatable")
    args = parser.parse_args()
    if args.rotate < 1:
        parser.error("--rotate: must be ≥ 1")
    if args.drain < 0:
        parser.error("--drain: must be ≥ 0")
    tuning = {}
    for knob in args.tuning:
        key, _, value = knob.partition("=")
        if value not in ("0", "1"):
            parser.error(f"--tuning {knob}: must be KNOB=0 or KNOB=1 (a boolean knob)")
        tuning[key] = value == "1"
    for spec in args.case or ["ll-std:1", "ll-1:8", "ll-std:8"]:
        name, ranks = spec.split(":")
        kinds = (["exchange"] if args.exchange else
                 ["stacked"] + (["lists"] if args.lists else []) + (["nccl"] if args.nccl and ranks == "1" else []))
        for kind in kinds:
            for fast in ((True, False) if kind == "stacked" and _fast.torch_fast_module() is not None else (False,)):
                measure(name, int(ranks), args.calls, kind, device=args.device, stub=args.stub, hidden=args.hidden, tuning=tuning,
                        rotate=args.rotate, grad=args.grad, drain=args.drain, fast=fast)
