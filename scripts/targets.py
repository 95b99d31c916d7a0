#!/usr/bin/env python3
"""The project's performance targets (one H200, docs/performance.md) against ep-bench results.

    python3 scripts/targets.py [--defines NAME=value,...] RUN.json [RUN.json ...]

Reads every entry of the given `ep-bench run --json` files and prints, per target, each run's
median (and the graph replay's figure beside it), the median over runs, and whether that meets the
target. A target no file measured says so. The targets are stated for one H200: figures of another
card are reported as below or above the bound, not as met or missed. Exit status: 0 no target
missed, 1 one missed (on an H200), 2 a file that cannot be read (or a --defines that names no
switch). Only runs of the standard cases as they are count (no shape, layout, dtype, SM or tuning
option; virtual ranks), and not those ep-bench marked not validated or host-paced (the line says
how many were left out). Runs of a kernel variant (`EP_KERNEL_DEFINES`, recorded as
`run.kernelDefines`) count only where `--defines` names that variant (its switches in any order),
and then only they: the table is the variant's. (Results of an ep-bench older than that record say
nothing of a variant: pass none of a variant's runs from such a build.) `scripts/device-verify
targets` runs the cases these need and calls this; `EP_KERNEL_DEFINES=... bash
scripts/device-verify targets` runs them as a variant and passes `--defines` itself.
"""
import argparse
import json
import re
import statistics
import sys

# (label, case, ranks, fp8 mode, fp8 source, skew, metric, bound, "<=" or ">=")
# metric: a phase's median µs ("step", "dispatch", "combine", "update"), "fold" (update + dispatch
# in one launch, less the dispatch alone: what the LL update adds), "combine%" (combine's percent of
# its floor).
TARGETS = [
    ("ll-std step, 8 virtual", "ll-std", 8, None, None, 0, "step", 75, "<="),
    ("ht-std step, 8 virtual", "ht-std", 8, None, None, 0, "step", 1600, "<="),
    ("ht-4k step, 8 virtual", "ht-4k", 8, None, None, 0, "step", 900, "<="),
    ("ll-std step, one rank", "ll-std", 1, None, None, 0, "step", 20, "<="),
    ("ht-std step, one rank", "ht-std", 1, None, None, 0, "step", 100, "<="),
    ("ll-1 dispatch, 8 virtual", "ll-1", 8, None, None, 0, "dispatch", 6, "<="),
    ("ll-1 combine, 8 virtual", "ll-1", 8, None, None, 0, "combine", 6, "<="),
    ("ll-1 dispatch, one rank", "ll-1", 1, None, None, 0, "dispatch", 5, "<="),
    ("ll-1 combine, one rank", "ll-1", 1, None, None, 0, "combine", 5, "<="),
    ("ll-std update folded (upd+disp - dispatch)", "ll-std", 8, None, None, 0, "fold", 3, "<="),
    ("ht-4k update", "ht-4k", 8, None, None, 0, "update", 35, "<="),
    ("ht-std combine % of floor", "ht-std", 8, None, None, 0, "combine%", 85, ">="),
    ("ht-4k combine % of floor", "ht-4k", 8, None, None, 0, "combine%", 85, ">="),
    ("ht-std combine % of floor, skew 1", "ht-std", 8, None, None, 1, "combine%", 85, ">="),
    ("ht-4k combine % of floor, skew 1", "ht-4k", 8, None, None, 1, "combine%", 85, ">="),
    ("FP8 ll-std dispatch (quantised), 8 virtual", "ll-std", 8, "ue8m0", "quantize", 0, "dispatch", 24, "<="),
    ("FP8 ll-std dispatch (quantised), one rank", "ll-std", 1, "ue8m0", "quantize", 0, "dispatch", 6, "<="),
    ("FP8 ht-std dispatch (passed through), 8 virtual", "ht-std", 8, "float32", "pass-through", 0, "dispatch", 450, "<="),
]
TARGET_DEVICE = "H200"


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shape_error(entry):
    """Why `entry` is not an ep-bench result as this script reads one, or None."""
    if not isinstance(entry, dict):
        return f"a JSON {type(entry).__name__}, not an object"
    if not isinstance(entry.get("name"), str) or not isinstance(entry.get("ranks"), int) \
            or not isinstance(entry.get("device"), str):
        return "no name, ranks and device as ep-bench writes them"
    run = entry.get("run")
    options = run.get("options") if isinstance(run, dict) else None
    if run is not None and (not isinstance(run, dict) or not isinstance(options or {}, dict)):
        return "run or run.options is not an object"
    if options and options.get("skew") is not None and not _number(options["skew"]):
        return "run.options.skew is not a number"
    if run is not None and run.get("kernelDefines") is not None and not isinstance(run["kernelDefines"], str):
        return "run.kernelDefines is not a string"
    for name in ("step", "dispatch", "combine", "update", "updateDispatch"):
        p = entry.get(name)
        if p is not None and (not isinstance(p, dict)
                              or any(p.get(k) is not None and not _number(p[k])
                                     for k in ("median", "graphMicroseconds", "percentOfFloor"))):
            return f"{name} is not a phase of numbers"
    return None


def entries(paths):
    for path in paths:
        with open(path) as f:
            try:
                data = json.load(f)
            except ValueError as error:
                raise ValueError(f"{path}: not JSON ({error})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: not a list of ep-bench results")
        for i, entry in enumerate(data):
            why = _shape_error(entry)
            if why is not None:
                raise ValueError(f"{path}: entry {i} is not an ep-bench result ({why})")
            yield entry


# The options a target's run leaves as they are: the standard case's shape, layout and element
# type, every SM, the default tuning, virtual ranks (absent keys: a file of an older ep-bench).
STANDARD = {"tokens": None, "maxTokens": None, "hidden": None, "topK": None, "experts": None, "layout": None,
            "alignment": None, "dtype": "bf16", "sms": [], "pipelineDepth": 4, "rowsInFlight": 8, "rowPieces": None,
            "blocksPerSM": None, "updateChunkTokens": 256, "fullGrid": False, "serialLaunches": False,
            "fusedUpdate": None, "transport": "virtual", "tokenCounts": []}


def variant(text):
    """A kernel variant's switches in one order (ep-bench sorts them by name), or None: the default."""
    if not text:
        return None
    return ",".join(sorted(part.strip() for part in text.split(",") if part.strip())) or None


def variant_of(entry):
    return variant((entry.get("run") or {}).get("kernelDefines"))


def options_of(entry):
    return (entry.get("run") or {}).get("options") or {}


def standard(entry, skew):
    options = options_of(entry)
    if float(options.get("skew", 0)) != skew or entry.get("backend") != "gpu" or entry.get("rank") is not None:
        return False
    return all(options.get(key, value) == value for key, value in STANDARD.items())


def value(entry, metric):
    """(events µs or percent, graph µs or None) of `metric` in `entry`, or None where it has none."""
    def phase(name):
        p = entry.get(name)
        return p if isinstance(p, dict) and p.get("median") is not None else None
    if metric == "fold":
        both, alone = phase("updateDispatch"), phase("dispatch")
        if both is None or alone is None:
            return None
        graph = None
        if both.get("graphMicroseconds") is not None and alone.get("graphMicroseconds") is not None:
            graph = both["graphMicroseconds"] - alone["graphMicroseconds"]
        return both["median"] - alone["median"], graph
    if metric == "combine%":
        p = phase("combine")
        return None if p is None or p.get("percentOfFloor") is None else (p["percentOfFloor"], None)
    p = phase(metric)
    return None if p is None else (p["median"], p.get("graphMicroseconds"))


def report(paths, out=sys.stdout, defines=None):
    if defines is not None and variant(defines) is None:
        raise ValueError("--defines takes NAME=value,... (none: the default kernels, the runs without it)")
    defines = variant(defines)
    all_entries = list(entries(paths))
    devices = sorted({e.get("device", "?") for e in all_entries})
    missed = False
    # (a word of the name: a GH200, Grace Hopper, is not an H200)
    verdict = bool(devices) and all(re.search(rf"\b{TARGET_DEVICE}\b", d) for d in devices)
    print(f"devices: {', '.join(devices) or 'none'}", file=out)
    if not verdict:
        print(f"the targets are for one {TARGET_DEVICE}: figures of another card are no verdict on them", file=out)
    if defines is not None:
        print(f"kernel variant: {defines} (its runs only)", file=out)
    for label, case, ranks, fp8, source, skew, metric, bound, sense in TARGETS:
        runs, left_out = [], []
        for e in all_entries:
            if (e.get("name"), e.get("ranks"), e.get("fp8"), e.get("fp8Source")) != (case, ranks, fp8, source):
                continue
            if not standard(e, skew):
                continue
            v = value(e, metric)
            if v is None:
                continue
            kernels = variant_of(e)
            if kernels != defines:
                left_out.append("the default kernels" if kernels is None else "another kernel variant")
                continue
            # (a run whose results differ from the CPU oracle, or one the host paced, whose figures
            # are the host's calls and not the GPU's: no verdict of theirs counts)
            if e.get("validated") is False or e.get("hostPaced") is True:
                left_out.append("not validated" if e.get("validated") is False else "host-paced")
                continue
            runs.append(v)
        note = f" ({len(left_out)} run(s) left out: {', '.join(sorted(set(left_out)))})" if left_out else ""
        if not runs:
            print(f"{label:50s} {sense} {bound:<6g} not measured{note}", file=out)
            continue
        middle = statistics.median(v for v, _ in runs)
        met = middle <= bound if sense == "<=" else middle >= bound
        missed |= verdict and not met
        word = ("met" if met else "NOT MET") if verdict else ("below" if middle < bound else "above")
        shown = "  ".join(f"{v:.2f}" + (f" [{g:.2f}]" if g is not None else "") for v, g in runs)
        print(f"{label:50s} {sense} {bound:<6g} {word:7s} median {middle:.2f}: {shown}{note}", file=out)
    return 1 if missed else 0


def command(prog, doc, argv, report, options=None):
    """The command line of a script that reads ep-bench results (its `options`: flag -> argparse's
    keywords, passed to `report` by name, then the files); exit status 2 where one cannot be read."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, keywords in (options or {}).items():
        parser.add_argument(flag, **keywords)
    parser.add_argument("files", nargs="+", metavar="RUN.json")
    args = vars(parser.parse_args(argv))
    try:
        return report(args.pop("files"), **args)
    except (OSError, ValueError) as error:
        print(f"{prog.removesuffix('.py')}: {error}", file=sys.stderr)
        return 2


def main(argv):
    return command("targets.py", __doc__, argv, report,
                   {"--defines": {"metavar": "NAME=value,...", "help": "read the runs of this kernel variant only"}})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
