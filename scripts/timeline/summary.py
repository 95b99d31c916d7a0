"""Summary of a timeline written by scripts/timeline/inject.c (scripts/kernel-timeline): per
kernel name, its launches, the median and minimum of its GPU durations, and the median idle time
of its stream just before it started (from the end of the stream's previous kernel; idle times
over --idle-limit µs, a held stream or the host's pause, are counted apart and left out of the
median). With driver records (TIMELINE_API), the same for the driver calls' host time.

    python3 scripts/timeline/summary.py TIMELINE [--idle-limit 1000]
"""
import argparse
import collections
import statistics
import sys


def read(path):
    """(kernels, calls): kernels as (start ns, end ns, name, stream), calls as (start ns, end ns, name)."""
    kernels, calls = [], []
    with open(path) as lines:
        for line in lines:
            fields = line.split()
            if len(fields) == 7 and fields[0] == "K":
                kernels.append((int(fields[1]), int(fields[2]), fields[3], fields[6]))
            elif len(fields) == 4 and fields[0] == "A":
                calls.append((int(fields[1]), int(fields[2]), fields[3]))
    return kernels, calls


def kernel_rows(kernels, idle_limit_us):
    """Per kernel name, in order of first launch: (name, launches, median µs, minimum µs, median
    idle µs before it or None, launches after a longer idle time)."""
    durations, idle, long_idle, order = collections.defaultdict(list), collections.defaultdict(list), collections.Counter(), []
    last_end = {}
    for start, end, name, stream in sorted(kernels):
        if name not in durations:
            order.append(name)
        durations[name].append((end - start) / 1000)
        if stream in last_end:
            gap = (start - last_end[stream]) / 1000
            if gap > idle_limit_us:
                long_idle[name] += 1
            else:
                idle[name].append(gap)
        last_end[stream] = max(end, last_end.get(stream, end))
    return [(name, len(durations[name]), statistics.median(durations[name]), min(durations[name]),
             statistics.median(idle[name]) if idle[name] else None, long_idle[name]) for name in order]


def call_rows(calls):
    """Per driver function, most total time first: (name, calls, median µs, total ms)."""
    times = collections.defaultdict(list)
    for start, end, name in calls:
        times[name].append((end - start) / 1000)
    rows = [(name, len(t), statistics.median(t), sum(t) / 1000) for name, t in times.items()]
    return sorted(rows, key=lambda row: -row[3])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timeline")
    parser.add_argument("--idle-limit", type=float, default=1000.0, help="µs of idle stream beyond which a gap is not a launch's")
    args = parser.parse_args(argv)
    kernels, calls = read(args.timeline)
    print(f"{'kernel':32s} {'launches':>8s} {'median µs':>10s} {'min µs':>8s} {'idle before µs':>15s} {'after longer idle':>18s}")
    for name, launches, median, minimum, idle, long_idle in kernel_rows(kernels, args.idle_limit):
        shown = f"{idle:.2f}" if idle is not None else "-"
        print(f"{name:32s} {launches:8d} {median:10.2f} {minimum:8.2f} {shown:>15s} {long_idle:18d}")
    if calls:
        print(f"\n{'driver call':32s} {'calls':>8s} {'median µs':>10s} {'total ms':>10s}")
        for name, count, median, total in call_rows(calls):
            print(f"{name:32s} {count:8d} {median:10.2f} {total:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
