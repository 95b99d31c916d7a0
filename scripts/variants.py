#!/usr/bin/env python3
"""Kernel variants beside the default kernels, from ep-bench results.

    python3 scripts/variants.py RUN.json [RUN.json ...]

Reads every entry of the given `ep-bench run --json` files and groups them by case (name, ranks,
tokens per rank, element type and FP8 mode, skew, a layout asked for) and by kernel variant
(`EP_KERNEL_DEFINES` as the run recorded it: `run.kernelDefines`; none is the default kernels).
For each case and phase it prints each variant's median over its runs of the per-run median µs
(the graph replay's beside it, in brackets) and the change against the default's. A variant any of
whose runs ep-bench found to differ from the CPU oracle is marked MISMATCH on every line of its
case: its figures do not count. Runs ep-bench marked host-paced (the host's calls set the pace, not
the GPU) are left out, and the last line counts them.
Run the variants alternately, in separate processes, in one call (`bash scripts/device-verify bulk`
does): figures of different machines or different calls are not compared.
Exit status: 0, 1 where a run differs from the oracle, 2 a file that cannot be read.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from targets import command, entries, variant_of  # noqa: E402  (the same reading of results and of a variant)

PHASES = ("update", "dispatch", "updateDispatch", "combine", "step")
SHOWN = {"updateDispatch": "upd+disp"}


def case_of(entry):
    options = (entry.get("run") or {}).get("options") or {}
    dtype = entry.get("dtype") or "bf16"
    if entry.get("fp8"):
        dtype = f"fp8/{entry['fp8']}" + ("/pass" if entry.get("fp8Source") == "pass-through" else "")
    # (the layout where it was asked for: each case's own is the default)
    return (entry["name"], entry.get("ranks"), entry.get("tokens"), dtype, float(options.get("skew") or 0), options.get("layout") or "")


def figures(entry, phase):
    p = entry.get(phase)
    if not isinstance(p, dict) or not isinstance(p.get("median"), (int, float)):
        return None
    graph = p.get("graphMicroseconds")
    return p["median"], graph if isinstance(graph, (int, float)) else None


def report(paths, out=sys.stdout):
    runs = {}         # case -> variant -> phase -> [(median, graph)]
    mismatched = set()
    host_paced = 0
    for entry in entries(paths):
        case, variant = case_of(entry), variant_of(entry) or "default"
        if entry.get("validated") is False:
            mismatched.add((case, variant))
        if entry.get("hostPaced") is True:
            host_paced += 1
            continue
        phases = runs.setdefault(case, {}).setdefault(variant, {})
        for phase in PHASES:
            f = figures(entry, phase)
            if f is not None:
                phases.setdefault(phase, []).append(f)
    print(f"{'case':8s} {'R':>2s} {'B':>5s} {'dtype':15s} {'skew':>4s} {'phase':9s} {'variant':34s} {'µs [graph]':>18s} {'runs':>4s} {'change':>8s}", file=out)
    for case in sorted(runs, key=str):
        variants = runs[case]
        for phase in PHASES:
            base = variants.get("default", {}).get(phase)
            base_median = statistics.median(m for m, _ in base) if base else None
            for variant in sorted(variants, key=lambda v: (v != "default", v)):
                values = variants[variant].get(phase)
                if not values:
                    continue
                median = statistics.median(m for m, _ in values)
                graphs = [g for _, g in values if g is not None]
                shown = f"{median:.2f}" + (f" [{statistics.median(graphs):.2f}]" if graphs else "")
                change = "" if variant == "default" or not base_median else f"{100 * (median - base_median) / base_median:+.1f} %"
                mark = "  MISMATCH" if (case, variant) in mismatched else ""
                name, ranks, tokens, dtype, skew, layout = case
                label = name + (f"/{layout}" if layout else "")
                print(f"{label:8s} {ranks!s:>2s} {tokens!s:>5s} {dtype:15s} {skew:4g} {SHOWN.get(phase, phase):9s} {variant:34s} {shown:>18s} "
                      f"{len(values):4d} {change:>8s}{mark}", file=out)
    if host_paced:
        print(f"left out: {host_paced} host-paced run(s)", file=out)
    return 1 if mismatched else 0


def main(argv):
    return command("variants.py", __doc__, argv, report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
