"""scripts/timeline/summary.py, the summary of a CUPTI timeline (scripts/kernel-timeline), on a
made-up timeline: durations, the idle time before each kernel on its own stream, long idle
times counted apart, driver calls by total time."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("timeline_summary", ROOT / "scripts" / "timeline" / "summary.py")
summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summary)

# Times in ns. Stream 7: a hold, then a → b → a → b with 2, 3, 4 µs idle between them (a's first
# launch follows the hold's end by 500 µs: over the limit below). Stream 9: one c, alone.
TIMELINE = """\
K 0 1000000 ep_delay 1 1 7
K 1500000 1504000 a 1 8 7
K 1506000 1509000 b 1 8 7
K 1512000 1516000 a 1 8 7
K 1520000 1523500 b 1 8 7
K 1505000 1507000 c 4 1 9
A 100 2100 cuLaunchKernel
A 5000 9000 cuLaunchKernel
A 10000 11000 cuEventRecord
a line the injection never writes
"""


@pytest.fixture
def timeline(tmp_path):
    path = tmp_path / "timeline.txt"
    path.write_text(TIMELINE)
    return path


def test_kernels_their_durations_and_the_idle_time_before_them(timeline):
    kernels, calls = summary.read(timeline)
    assert len(kernels) == 6 and len(calls) == 3
    rows = {row[0]: row[1:] for row in summary.kernel_rows(kernels, idle_limit_us=100)}
    assert list(rows) == ["ep_delay", "a", "c", "b"]   # order of first launch
    assert rows["a"] == (2, 4.0, 4.0, 3.0, 1)   # idle 3 µs before its second launch; 500 µs before its first, counted apart
    assert rows["b"] == (2, pytest.approx(3.25), 3.0, 3.0, 0)   # idle 2 and 4 µs
    assert rows["c"] == (1, 2.0, 2.0, None, 0)   # first on its stream: no idle time
    assert rows["ep_delay"][3] is None


def test_driver_calls_most_total_time_first(timeline):
    _, calls = summary.read(timeline)
    assert summary.call_rows(calls) == [("cuLaunchKernel", 2, 3.0, 0.006), ("cuEventRecord", 1, 1.0, 0.001)]


def test_the_command_line_prints_both_tables(timeline, capsys):
    assert summary.main([str(timeline), "--idle-limit", "100"]) == 0
    out = capsys.readouterr().out
    assert "idle before µs" in out and "driver call" in out
    line = next(line for line in out.splitlines() if line.startswith("a "))
    assert line.split() == ["a", "2", "4.00", "4.00", "3.00", "1"]
