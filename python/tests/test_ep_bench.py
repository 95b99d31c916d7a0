"""ep-bench's command line: every numeric option is range-checked with a message naming the
option, the value and the bound (exit status 64, never a trap), and a --json path that cannot be
written fails before the run starts; on the CPU, the step row and its floor, the four layouts,
the element types, custom shapes, --sms, the run record in the JSON, the progress line, and FP8
dispatch (--fp8, --fp8-source: validated, its wire bytes counted, refused with NCCL ranks), and the
SVG plot of --plot and `ep-bench plot` (with the Python bench's baseline).
Runs the debug ep-bench that `swift build --build-tests` leaves in .build/debug (CI builds it
before scripts/test), or $EP_BENCH."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(os.environ.get("EP_BENCH", ROOT / ".build" / "debug" / "ep-bench"))

pytestmark = pytest.mark.skipif(not BENCH.is_file(), reason=f"no ep-bench at {BENCH} (swift build --build-tests)")

USAGE = 64  # ArgumentParser's exit status for a bad command line (EX_USAGE)


def bench(*args, timeout=120, env=None):
    # CPU only: the run must not depend on a GPU (and is fast on ll-1).
    return subprocess.run([str(BENCH), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "EP_CUDA_DRIVER_PATH": "/nonexistent", **(env or {})})


def assert_rejected(result, *fragments):
    # A negative status is a signal (a Swift trap is SIGILL or SIGTRAP): never acceptable.
    assert result.returncode >= 0, f"ep-bench died of signal {-result.returncode}:\n{result.stderr}"
    assert result.returncode == USAGE, f"status {result.returncode}:\n{result.stdout}\n{result.stderr}"
    message = result.stderr.splitlines()[0]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    # Rejected before anything ran: no benchmark output, no NSError dump.
    assert "backend" not in result.stdout and "running" not in result.stderr
    assert "NSCocoaError" not in result.stderr and "Fatal error" not in result.stderr


@pytest.mark.parametrize("args, fragments", [
    (["--warmup=-1", "--iterations", "1"], ["--warmup -1", "0...10000"]),
    (["--warmup=-1"], ["--warmup -1", "0...10000"]),
    (["--warmup", "9223372036854775807"], ["--warmup 9223372036854775807", "0...10000"]),
    (["--warmup", "10001"], ["--warmup 10001", "0...10000"]),
    (["--iterations", "0"], ["--iterations 0", "1...100000"]),
    (["--iterations=-5"], ["--iterations -5", "1...100000"]),
    (["--iterations", "9223372036854775807"], ["--iterations 9223372036854775807", "1...100000"]),
    (["--ranks", "0"], ["--ranks 0", "1...64"]),
    (["--ranks", "128"], ["--ranks 128", "1...64"]),
    (["--ranks", "3"], ["--ranks 3", "does not divide"]),
    (["--skew=-1"], ["--skew -1.0", "0.0...100.0"]),
    (["--skew", "nan"], ["--skew nan", "0.0...100.0"]),
    (["--skew", "inf"], ["--skew inf", "0.0...100.0"]),
    (["--sms", "0"], ["--sms 0", "1...4096"]),
    (["--pipeline-depth", "0"], ["--pipeline-depth 0", "1...8"]),
    (["--pipeline-depth", "9"], ["--pipeline-depth 9", "1...8"]),
    (["--rows-in-flight", "17"], ["--rows-in-flight 17", "1...16"]),
    (["--row-pieces", "0"], ["--row-pieces 0", "1...4096"]),
    (["--blocks-per-sm", "3"], ["--blocks-per-sm 3", "1...2"]),
    (["--update-chunk-tokens", "0"], ["--update-chunk-tokens 0", "1...4096"]),
    (["--timeout-ms", "0"], ["--timeout-ms 0", "1...86400000"]),
    (["--timeout-ms", "9223372036854775807"], ["--timeout-ms 9223372036854775807", "1...86400000"]),
    (["--transport", "nccl", "--drill", "dies", "--drill-rank=-1"], ["--drill-rank -1", "0..<2"]),
])
def test_out_of_range_values_are_usage_errors(args, fragments):
    assert_rejected(bench(*args), *fragments)


@pytest.mark.parametrize("args, fragments", [
    (["--warmup", "99999999999999999999999"], ["--warmup"]),    # does not fit an Int
    (["--iterations", "many"], ["--iterations"]),
    (["--seed=-1"], ["--seed"]),
])
def test_unparseable_values_are_usage_errors(args, fragments):
    assert_rejected(bench(*args), *fragments)


def test_info_device_must_not_be_negative():
    assert_rejected(bench("info", "--device=-1"), "--device -1", "≥ 0")


def test_json_in_a_missing_folder_fails_before_the_run(tmp_path):
    path = tmp_path / "missing" / "out.json"
    assert_rejected(bench("--case", "ll-1", "--json", str(path)), f"--json {path}", "does not exist")
    assert not path.exists()


def test_json_that_is_a_folder_fails_before_the_run(tmp_path):
    assert_rejected(bench("--case", "ll-1", "--json", str(tmp_path)), f"--json {tmp_path}", "is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_json_in_a_read_only_folder_fails_before_the_run(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_rejected(bench("--case", "ll-1", "--json", str(folder / "out.json")), "--json", "not writable")
    finally:
        folder.chmod(0o700)


def test_a_small_run_succeeds_and_writes_json(tmp_path):
    path = tmp_path / "out.json"
    result = bench("--case", "ll-1", "--backend", "cpu", "--iterations", "1", "--warmup", "0", "--json", str(path))
    assert result.returncode == 0, result.stderr
    (measurement,) = json.loads(path.read_text())
    assert measurement["name"] == "ll-1" and measurement["validated"] is True and measurement["iterations"] == 1


def test_help_documents_the_exit_status():
    result = bench("--help")
    assert result.returncode == 0
    for line in ["Exit status:", "0   every case ran", "1   a case failed", "64  usage"]:
        assert line in result.stdout


# A custom shape small enough that a debug build runs it in about a second.
TINY = ["--tokens", "4", "--hidden", "16", "--topk", "2", "--experts", "4", "--ranks", "2"]
QUICK = ["--backend", "cpu", "--iterations", "2", "--warmup", "0"]


def run_json(tmp_path, *args, env=None):
    """A run that must succeed; its table (stdout), stderr and JSON entries."""
    path = tmp_path / "out.json"
    result = bench(*QUICK, *args, "--json", str(path), env=env)
    assert result.returncode == 0, f"status {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result, json.loads(path.read_text())


def table_rows(stdout, phase):
    """The table's rows of one phase, split into cells (two spaces or more between cells)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines()]
    return [row for row in rows if len(row) > 6 and row[6] == phase]


def test_the_step_row_and_its_floor_are_in_the_table_and_the_json(tmp_path):
    result, (m,) = run_json(tmp_path, "--case", "custom", *TINY)
    assert m["validated"] is True and m["iterations"] == 2
    step, dispatch, combine = m["step"], m["dispatch"], m["combine"]
    # One reading of the whole sequence per iteration, with the dispatch + combine floor.
    assert 0 < step["minimum"] <= step["median"] <= step["maximum"]
    assert step["floorBytes"] == dispatch["floorBytes"] + combine["floorBytes"] == 2 * m["floorBytes"]
    assert step["bytesPerRank"] == 2 * m["bytesPerRank"]
    assert step["floorMicroseconds"] == pytest.approx(step["floorBytes"] / (m["copyBandwidthGBs"] * 1e3))
    assert step["percentOfFloor"] == pytest.approx(100 * step["floorMicroseconds"] / step["median"])
    assert "floorBytes" not in m["update"]   # the update has no floor
    (row,) = table_rows(result.stdout, "step")
    assert row[0] == "custom" and row[6] == "step" and row[-1] == "yes"
    assert float(row[11]) == pytest.approx(step["floorMicroseconds"], rel=0.01)
    assert "step: update + dispatch + combine read as one sequence" in result.stdout
    # The graph column (GPU virtual ranks: calls replayed from a CUDA graph) is empty on the CPU,
    # and the JSON has neither its figures nor the hold's verdict there.
    header = re.split(r"\s{2,}", next(line for line in result.stdout.splitlines() if line.startswith("case")).strip())
    assert header[7:12] == ["median µs", "min µs", "max µs", "graph µs", "GB/s/rank"]
    assert all("graphMicroseconds" not in m[phase] for phase in ("update", "dispatch", "combine", "step"))
    assert "hostPaced" not in m
    # The step read with events between its calls is a GPU loop's second reading: null here.
    assert "stepWithPhaseEvents" in m and m["stepWithPhaseEvents"] is None


@pytest.mark.parametrize("layout, algorithm, shown", [
    ("expert-major", "ll", "expert-major"),
    ("rank-major", "ll", "rank-major"),
    ("flat", "ht", "flat"),
    ("expert-major-padded", "ht", "expert-major(alignment 1)"),
])
def test_each_layout_runs_and_validates_on_the_cpu(tmp_path, layout, algorithm, shown):
    _, (m,) = run_json(tmp_path, "--case", "custom", *TINY, "--layout", layout)
    assert (m["algorithm"], m["layout"], m["validated"]) == (algorithm, shown, True)
    assert m["run"]["options"]["layout"] == layout


def test_the_padded_layout_takes_the_alignment(tmp_path):
    _, (m,) = run_json(tmp_path, "--case", "custom", *TINY, "--layout", "expert-major-padded", "--alignment", "4")
    assert m["layout"] == "expert-major(alignment 4)" and m["validated"] is True


def test_a_layout_overrides_a_standard_case(tmp_path):
    _, (m,) = run_json(tmp_path, "--case", "ll-1", "--layout", "rank-major", "--hidden", "64", "--experts", "16")
    assert (m["name"], m["layout"], m["hidden"], m["experts"], m["ranks"]) == ("ll-1", "rank-major", 64, 16, 8)


def test_odd_runs_its_variant_of_the_layouts_algorithm(tmp_path):
    _, entries = run_json(tmp_path, "--case", "odd", "--layout", "flat", "--tokens", "2", "--hidden", "8")
    assert [(m["name"], m["algorithm"], m["layout"]) for m in entries] == [("odd", "ht", "flat")]


@pytest.mark.parametrize("args, fragments", [
    (["--case", "ll-1", "--layout", "flat"], ["--layout flat", "case ll-1 (LL)", "expert-major, rank-major"]),
    (["--case", "ht-cpu", "--layout", "rank-major"], ["--layout rank-major", "case ht-cpu (HT)", "flat, expert-major-padded"]),
    (["--case", "ll-std", "--layout", "expert-major-padded"], ["--layout expert-major-padded", "ll-std", "expert-major, rank-major"]),
    (["--layout", "diagonal"], ["'diagonal'", "--layout", "'expert-major', 'rank-major', 'flat' or 'expert-major-padded'"]),
    (["--alignment", "4"], ["--alignment 4", "--layout expert-major-padded"]),
    (["--layout", "flat", "--alignment", "4"], ["--alignment 4", "got --layout flat"]),
    (["--layout", "expert-major-padded", "--alignment", "0"], ["--alignment 0", "1...1024"]),
])
def test_a_layout_that_does_not_fit_is_a_usage_error(args, fragments):
    assert_rejected(bench(*args), *fragments)


def test_dtype_f32_runs_and_validates(tmp_path):
    _, (m,) = run_json(tmp_path, "--case", "custom", *TINY, "--dtype", "f32")
    assert m["dtype"] == "f32" and m["validated"] is True
    assert m["dispatch"]["floorBytes"] == 2 * _bf16_floor(tmp_path)   # 4-byte elements, the same rows


def _bf16_floor(tmp_path):
    _, (m,) = run_json(tmp_path, "--case", "custom", *TINY)
    return m["dispatch"]["floorBytes"]


@pytest.mark.parametrize("layout", ["expert-major", "rank-major", "flat", "expert-major-padded"])
def test_dtype_u8_is_dispatch_only_with_a_note(tmp_path, layout):
    result, (m,) = run_json(tmp_path, "--case", "custom", *TINY, "--dtype", "u8", "--layout", layout)
    assert m["dtype"] == "u8" and m["validated"] is True   # the received rows, checked as a multiset
    assert "combine" not in m and "u8 is dispatch only" in m["combineSkipped"]
    # The step is update + dispatch; its floor is the dispatch floor alone.
    assert m["step"]["floorBytes"] == m["dispatch"]["floorBytes"] and m["step"]["median"] > 0
    (row,) = table_rows(result.stdout, "combine")
    assert "skipped: u8 is dispatch only" in row[-1]


def test_a_custom_shape_runs_with_the_shape_given(tmp_path):
    _, (m,) = run_json(tmp_path, "--case", "custom", "--tokens", "3", "--hidden", "24", "--topk", "3",
                       "--experts", "6", "--ranks", "3")
    assert (m["name"], m["tokens"], m["hidden"], m["topK"], m["experts"], m["ranks"]) == ("custom", 3, 24, 3, 6, 3)
    assert (m["algorithm"], m["layout"], m["dtype"], m["validated"]) == ("ll", "expert-major", "bf16", True)


@pytest.mark.parametrize("args, fragments", [
    (["--case", "custom", "--tokens", "4"], ["case custom", "--hidden, --topk, --experts, --ranks"]),
    (["--case", "custom", *TINY[:2], "--hidden", "7", *TINY[4:]], ["--hidden 7", "14 bytes", "multiple of 8 bytes"]),
    (["--case", "custom", *TINY[:4], "--topk", "5", *TINY[6:]], ["--topk 5", "--experts 4"]),
    (["--case", "custom", *TINY[:6], "--experts", "5", *TINY[8:]], ["--experts 5", "--ranks 2"]),
    (["--case", "ll-1", "--experts", "100"], ["--experts 100", "8 ranks of case ll-1"]),
    (["--case", "ll-1", "--experts", "4", "--ranks", "4"], ["--experts 4", "top-k 8 of case ll-1"]),
    (["--case", "ll-1", "--dtype", "u8", "--hidden", "7"], ["--hidden 7", "7 bytes"]),
    (["--tokens", "0"], ["--tokens 0", "1...1048576"]),
    (["--hidden=-8"], ["--hidden -8", "1...1048576"]),
    (["--topk", "33"], ["--topk 33", "1...32"]),
    (["--experts", "0"], ["--experts 0", "1...1048576"]),
    (["--experts", "2097152"], ["--experts 2097152", "1...1048576"]),
    (["--case", "ll-1", "--tokens", "1048576", "--hidden", "1048576"], ["case ll-1", "host memory"]),
    # Shapes that fit in memory but whose routing draws tokens × experts × ranks random scores
    # (hours, not seconds): bounded up front, naming each option or the case's own value.
    (["--backend", "cpu", "--case", "custom", "--tokens", "1048576", "--hidden", "8", "--topk", "2", "--experts", "1048576",
      "--ranks", "1", "--layout", "flat"],
     ["--tokens 1048576 × --experts 1048576 × --ranks 1 = 1099511627776 random expert scores", "more than 4294967296"]),
    (["--case", "ht-cpu", "--tokens", "1024", "--hidden", "8", "--experts", "1048576"],
     ["--tokens 1024 × --experts 1048576 × the 8 ranks of case ht-cpu = 8589934592", "more than 4294967296"]),
    (["--dtype", "i32"], ["'i32'", "--dtype", "'bf16', 'f16', 'f32' or 'u8'"]),
    # A tuning knob on the CPU backend, which runs no kernels: refused by its option and value.
    (["--backend", "cpu", "--case", "custom", *TINY, "--row-pieces", "3000"], ["--row-pieces 3000", "applies to the GPU backend"]),
    (["--case", "nope"], ["unknown case 'nope'", "custom"]),
])
def test_a_bad_shape_is_a_named_usage_error(args, fragments):
    assert_rejected(bench(*args), *fragments)


@pytest.mark.parametrize("backend", [["--backend", "cpu"], []])
def test_sms_without_a_gpu_is_a_usage_error(backend):
    # Documented: --sms limits a GPU group; the CPU backend (chosen, or auto without a GPU) refuses it.
    result = bench(*backend, "--case", "custom", *TINY, "--sms", "16,32", "--iterations", "1")
    assert result.returncode == USAGE, result.stderr
    assert "Error: --sms 16,32 applies to the GPU backend" in result.stderr
    assert "backend cpu" not in result.stdout and "case" not in result.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--sms", "16,0"], ["--sms 0", "1...4096"]),
    (["--sms", "16", "--sms", "5000"], ["--sms 5000", "1...4096"]),
    (["--sms", "16,x"], ["'16,x'", "--sms"]),
    (["--transport", "nccl", "--drill", "dies", "--sms", "16"], ["--sms", "--drill"]),
    (["--transport", "nccl", "--drill", "dies", "--fp8", "ue8m0"], ["--fp8 ue8m0", "--drill"]),
    (["--transport", "nccl", "--dtype", "u8"], ["--dtype u8", "dispatch only"]),
])
def test_sms_lists_are_checked_before_the_run(args, fragments):
    assert_rejected(bench(*args), *fragments)


def test_the_json_records_the_run(tmp_path):
    _, (m,) = run_json(tmp_path, "--case", "custom", *TINY, "--seed", "7", "--skew", "0.5")
    run = m["run"]
    assert "commit" in run and (run["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", run["commit"]))
    assert "commitModified" in run and "commitSource" in run
    assert run["version"] == (ROOT / "VERSION").read_text().strip()
    assert run["seed"] == 7 and run["options"]["seed"] == 7 and run["options"]["skew"] == 0.5
    assert (run["backend"], run["transport"], run["iterations"], run["warmup"]) == ("cpu", "virtual", 2, 0)
    assert run["device"] == m["device"] and run["device"].startswith("CPU")
    assert run["driverVersion"] is None and run["nvrtcVersion"] is None   # the CPU run loads neither
    assert run["kernelDefines"] is None   # nor compiles a kernel
    assert run["tuning"] == {"sms": [], "pipelineDepth": 4, "rowsInFlight": 8, "rowPieces": None, "blocksPerSM": None,
                             "updateChunkTokens": 256, "fullGrid": False, "serialLaunches": False, "fusedUpdate": None}
    for key in ["cases", "ranks", "tokens", "hidden", "topK", "experts", "layout", "alignment", "dtype", "iterations",
                "warmup", "sms", "pipelineDepth", "rowsInFlight", "rowPieces", "blocksPerSM", "updateChunkTokens", "fullGrid",
                "serialLaunches", "fusedUpdate", "timeoutMs", "json"]:
        assert key in run["options"], key
    assert run["options"]["tokens"] == 4 and run["options"]["layout"] is None
    assert run["arguments"][-2:] == ["--json", str(tmp_path / "out.json")]
    assert "tuning" in m and m["tuning"] is None   # what a GPU group ran with; none on the CPU


def test_a_kernel_variant_is_not_recorded_where_no_kernel_ran(tmp_path):
    # EP_KERNEL_DEFINES changes the GPU's step kernels only: a CPU run is the default's figures.
    env = dict(os.environ, EP_KERNEL_DEFINES="EP_LL_AHEAD=0,EP_HT_BULK=1")
    result, (m,) = run_json(tmp_path, "--case", "custom", *TINY, env=env)
    assert m["run"]["kernelDefines"] is None and "kernel variant" not in result.stdout


def test_ep_commit_names_the_commit(tmp_path):
    _, (m,) = run_json(tmp_path, "--case", "custom", *TINY, env={"EP_COMMIT": "0123abcd"})
    assert (m["run"]["commit"], m["run"]["commitSource"]) == ("0123abcd", "EP_COMMIT")


def test_the_python_bench_still_reads_the_json(tmp_path):
    from expert_parallel import bench as python_bench
    path = tmp_path / "engine.json"
    result = bench(*QUICK, "--case", "custom", *TINY, "--json", str(path))
    assert result.returncode == 0, result.stderr
    figures = python_bench._engine_figures(str(path))
    assert set(figures) == {("custom", 2)} and figures[("custom", 2)]["engine_dispatch_us"] > 0


def test_progress_goes_to_stderr_only_when_asked(tmp_path):
    args = [*QUICK, "--case", "custom", "--case", "ll-1", *TINY]
    asked = bench(*args, "--progress")
    assert asked.returncode == 0, asked.stderr
    assert "[1/2] ll-1" in asked.stderr and "[2/2] custom" in asked.stderr
    assert "[1/2]" not in asked.stdout and "[2/2]" not in asked.stdout
    quiet = bench(*args)   # stderr is a pipe here, not a terminal
    assert quiet.returncode == 0 and "[1/" not in quiet.stderr and "[1/" not in quiet.stdout


# FP8 dispatch (CPU backend): hidden a multiple of every scale block (128), four 128-blocks per row.
FP8_SHAPE = ["--tokens", "4", "--hidden", "512", "--topk", "2", "--experts", "4", "--ranks", "2"]
FP8_HIDDEN = 512


def fp8_wire_row_bytes(mode, hidden):
    """Bytes of one FP8 row as dispatch moves it: one e4m3 byte per element plus the row's 4-byte
    scale words (float32: one per 128-block; ue8m0/e8m0: exponent bytes of 128/32-blocks, 4 a word)."""
    blocks = hidden // (32 if mode == "e8m0" else 128)
    words = blocks if mode == "float32" else (blocks + 3) // 4
    return hidden + 4 * words


@pytest.mark.parametrize("layout", ["expert-major", "flat"])
@pytest.mark.parametrize("source", ["quantize", "pass-through"])
@pytest.mark.parametrize("mode", ["float32", "ue8m0", "e8m0"])
def test_fp8_runs_validate_and_count_the_wire_bytes(tmp_path, mode, source, layout):
    shape = ["--case", "custom", *FP8_SHAPE, "--layout", layout]
    _, (plain,) = run_json(tmp_path, *shape)
    result, (m,) = run_json(tmp_path, *shape, "--fp8", mode, "--fp8-source", source)
    assert m["validated"] is True and m["iterations"] == 2
    assert (m["fp8"], m["fp8Source"], m["dtype"]) == (mode, source, "bf16")
    assert m["run"]["options"]["fp8"] == mode and m["run"]["options"]["fp8Source"] == source
    # The same routing (same seed) as the plain bf16 run: its bytes give the rows counted and received.
    row = 2 * FP8_HIDDEN
    counted = plain["dispatch"]["bytesPerRank"] / row                   # per rank (LL: selections; HT: pairs)
    source_rows = 2 * 4                                                 # ranks × tokens
    received = plain["dispatch"]["floorBytes"] / row - source_rows
    wire = fp8_wire_row_bytes(mode, FP8_HIDDEN)
    read = row if source == "quantize" else wire                        # quantize reads the bf16 rows
    assert m["dispatch"]["bytesPerRank"] == counted * wire == m["bytesPerRank"]
    assert m["dispatch"]["floorBytes"] == source_rows * read + received * wire == m["floorBytes"]
    # Combine is unchanged (bf16); the step's bytes and floor are dispatch's plus combine's.
    assert m["combine"]["bytesPerRank"] == plain["combine"]["bytesPerRank"]
    assert m["combine"]["floorBytes"] == plain["combine"]["floorBytes"]
    assert m["step"]["floorBytes"] == m["dispatch"]["floorBytes"] + m["combine"]["floorBytes"]
    assert m["step"]["bytesPerRank"] == m["dispatch"]["bytesPerRank"] + m["combine"]["bytesPerRank"]
    shown = f"fp8/{mode}" + ("/pass" if source == "pass-through" else "")
    assert all(r[2] == shown and r[-1] == "yes" for r in table_rows(result.stdout, "dispatch"))


def test_a_plain_run_records_no_fp8(tmp_path):
    _, (m,) = run_json(tmp_path, "--case", "custom", *TINY)
    assert m["fp8"] is None and m["fp8Source"] is None
    assert m["run"]["options"]["fp8"] is None and m["run"]["options"]["fp8Source"] is None


@pytest.mark.parametrize("args, fragments", [
    (["--backend", "cpu", "--case", "custom", *FP8_SHAPE[:2], "--hidden", "96", *FP8_SHAPE[4:], "--fp8", "float32"],
     ["--hidden 96", "multiple of 128"]),
    (["--backend", "cpu", "--case", "custom", *FP8_SHAPE[:2], "--hidden", "48", *FP8_SHAPE[4:], "--fp8", "e8m0"],
     ["--hidden 48", "multiple of 32"]),
    (["--backend", "cpu", "--case", "ll-1", "--dtype", "u8", "--fp8", "ue8m0"], ["--dtype u8", "bf16, f16 or f32"]),
    (["--fp8-source", "pass-through"], ["--fp8-source pass-through", "needs --fp8"]),
    (["--fp8", "e5m2"], ["'e5m2'", "--fp8"]),
])
def test_fp8_misuse_is_a_named_usage_error(args, fragments):
    assert_rejected(bench(*args), *fragments)


# --plot and `ep-bench plot`: an SVG of per-rank GB/s against tokens per rank.
SVG = "{http://www.w3.org/2000/svg}"
PLOT_SHAPE = ["--hidden", "16", "--topk", "2", "--experts", "4", "--ranks", "2"]


def plot_series(path):
    """The plot's series, by label: their polylines' points as (x, y) pixel pairs."""
    import xml.etree.ElementTree as ET
    root = ET.parse(path).getroot()   # raises on malformed XML
    assert root.tag == SVG + "svg"
    series = {}
    for line in root.iter(SVG + "polyline"):
        label = line.get("data-series")
        assert label not in series, f"two polylines for {label}"
        series[label] = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    return root, series


def test_tokens_takes_a_list_and_run_writes_a_plot(tmp_path):
    svg = tmp_path / "plot.svg"
    result, entries = run_json(tmp_path, "--case", "custom", "--tokens", "4,16", "--tokens", "64", *PLOT_SHAPE,
                               "--plot", str(svg))
    assert [m["tokens"] for m in entries] == [4, 16, 64]
    assert entries[0]["run"]["options"]["tokenCounts"] == [4, 16, 64] and entries[0]["run"]["options"]["tokens"] is None
    assert f"wrote {svg}" in result.stdout
    root, series = plot_series(svg)
    # This library's dispatch and combine and their floors, one point per token count.
    assert sorted(series) == ["ExpertParallel combine", "ExpertParallel dispatch", "floor combine", "floor dispatch"]
    for label, points in series.items():
        assert len(points) == 3, label
        xs = [x for x, _ in points]
        assert xs == sorted(xs) and len(set(xs)) == 3, label
    # 4 to 64 tokens: a log2 axis, its ticks powers of two; the legend names every series.
    texts = [t.text or "" for t in root.iter(SVG + "text")]
    assert any("log2" in t for t in texts)
    assert {"4", "8", "16", "32", "64"} <= {t.text for t in root.iter(SVG + "text") if t.get("class") == "xtick"}
    for label in series:
        assert label in texts
    title = root.find(SVG + "title").text
    assert entries[0]["device"] in title and "commit" in title
    # The floor's line is dashed; the library's is not.
    lines = {line.get("data-series"): line for line in root.iter(SVG + "polyline")}
    assert lines["floor dispatch"].get("stroke-dasharray") and not lines["ExpertParallel dispatch"].get("stroke-dasharray")


def test_the_plot_draws_the_tables_figures(tmp_path):
    # y is linear from 0: each point's height is in the ratio of the JSON's GB/s/rank (and floor GB/s = bytes / floor µs).
    svg = tmp_path / "plot.svg"
    _, entries = run_json(tmp_path, "--case", "custom", "--tokens", "4,8", *PLOT_SHAPE, "--plot", str(svg))
    root, series = plot_series(svg)
    bottom = max(float(line.get("y1")) for line in root.iter(SVG + "line") if line.get("x1") == line.get("x2"))
    def height(label, i):
        return bottom - series[label][i][1]
    d = [m["dispatch"] for m in entries]
    floor = [p["bytesPerRank"] / (p["floorMicroseconds"] * 1e3) for p in d]
    for i in range(2):
        assert height("floor dispatch", i) / height("floor dispatch", 0) == pytest.approx(floor[i] / floor[0], rel=0.02)
        ratio = d[i]["gbPerSecond"] / floor[0]
        assert height("ExpertParallel dispatch", i) / height("floor dispatch", 0) == pytest.approx(ratio, rel=0.05, abs=0.01)
    # 4 to 8 tokens: a linear axis.
    assert not any("log2" in (t.text or "") for t in root.iter(SVG + "text"))


def test_plot_from_a_saved_json_with_and_without_a_baseline(tmp_path):
    engine = tmp_path / "engine.json"
    result = bench(*QUICK, "--case", "custom", "--tokens", "4,16", *PLOT_SHAPE, "--json", str(engine))
    assert result.returncode == 0, result.stderr
    entries = json.loads(engine.read_text())
    assert [m["tokens"] for m in entries] == [4, 16]

    plain = tmp_path / "plain.svg"
    result = bench("plot", "--json", str(engine), "--out", str(plain))
    assert result.returncode == 0, result.stderr
    _, series = plot_series(plain)
    assert sorted(series) == ["ExpertParallel combine", "ExpertParallel dispatch", "floor combine", "floor dispatch"]
    assert all(len(points) == len(entries) for points in series.values())

    # The Python bench's rows (python/expert_parallel/bench.py --json): per call µs, no token count.
    custom = next(m for m in entries if m["name"] == "custom" and m["tokens"] == 16)
    baseline = tmp_path / "py.json"
    baseline.write_text(json.dumps([
        {"case": "custom", "ranks": 2, "tokens": 16, "device": "cpu", "iterations": 3, "host_dispatch_us": 9.0,
         "host_combine_us": 9.0, "baseline": "torch", "baseline_dispatch_us": 40.0, "baseline_combine_us": 60.0},
        {"case": "tiny", "ranks": 2, "device": "cpu", "iterations": 3, "baseline": "torch",
         "baseline_dispatch_us": 40.0, "baseline_combine_us": 60.0},   # no such entry: left out, with a note
    ]))
    both = tmp_path / "both.svg"
    result = bench("plot", "--json", str(engine), "--baseline", str(baseline), "--out", str(both))
    assert result.returncode == 0, result.stderr
    assert "tiny R=2" in result.stderr
    root, series = plot_series(both)
    assert sorted(series) == ["ExpertParallel combine", "ExpertParallel dispatch", "floor combine", "floor dispatch",
                              "torch combine", "torch dispatch"]
    assert len(series["torch dispatch"]) == 1 and len(series["torch combine"]) == 1
    # Drawn at the library's bytes for that case: GB/s = bytes / (µs × 1e3), shown in the point's tooltip.
    tips = [t.text for t in root.iter(SVG + "title") if t.text and t.text.startswith("torch dispatch")]
    assert tips == [f"torch dispatch: 16 tokens, {custom['dispatch']['bytesPerRank'] / 40e3:.3f} GB/s"]
    # The baseline's point sits at the library's 16 tokens; the legend names it.
    assert series["torch dispatch"][0][0] == series["ExpertParallel dispatch"][1][0]
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "torch dispatch" in texts and "torch combine" in texts


def test_a_baseline_that_matches_nothing_is_a_usage_error(tmp_path):
    engine = tmp_path / "engine.json"
    assert bench(*QUICK, "--case", "custom", "--tokens", "4", *PLOT_SHAPE, "--json", str(engine)).returncode == 0
    baseline = tmp_path / "py.json"
    baseline.write_text(json.dumps([{"case": "ll-std", "ranks": 8, "baseline": "torch", "baseline_dispatch_us": 1.0,
                                     "baseline_combine_us": 1.0}]))
    result = bench("plot", "--json", str(engine), "--baseline", str(baseline), "--out", str(tmp_path / "p.svg"))
    assert result.returncode == USAGE and "--baseline" in result.stderr
    assert not (tmp_path / "p.svg").exists()


def test_an_unwritable_plot_path_fails_before_the_run(tmp_path):
    path = tmp_path / "missing" / "plot.svg"
    assert_rejected(bench("--case", "ll-1", "--plot", str(path)), f"--plot {path}", "does not exist")
    assert_rejected(bench("--case", "ll-1", "--plot", str(tmp_path)), f"--plot {tmp_path}", "is a folder")
    result = bench("plot", "--json", str(tmp_path / "none.json"), "--out", str(path))
    assert result.returncode == USAGE and f"--out {path}" in result.stderr


@pytest.mark.parametrize("gbs", [5e-324, 1e-323, 4e-323])
def test_plot_draws_a_gbs_near_the_smallest_double(tmp_path, gbs):
    # A --json's GB/s a few subnormals above 0: the y axis's tick step underflowed to 0 and
    # Int(inf) trapped (SIGILL). Now one tick at the value, and a parseable SVG.
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps([{"name": "x", "ranks": 1, "tokens": 4, "dispatch": {"bytesPerRank": 1, "gbPerSecond": gbs}}]))
    svg = tmp_path / "p.svg"
    result = bench("plot", "--json", str(engine), "--out", str(svg))
    assert result.returncode == 0, f"status {result.returncode}:\n{result.stderr}"
    _, series = plot_series(svg)
    assert len(series["ExpertParallel dispatch"]) == 1


def test_plot_refuses_a_file_that_is_not_ep_bench_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    result = bench("plot", "--json", str(bad), "--out", str(tmp_path / "p.svg"))
    assert result.returncode == USAGE and "not an ep-bench --json file" in result.stderr
    result = bench("plot", "--json", str(tmp_path / "none.json"), "--out", str(tmp_path / "p.svg"))
    assert result.returncode == USAGE and "cannot be read" in result.stderr


@pytest.mark.parametrize("tokens", ["4.5", "1e30", "99999999999999999999"])
def test_plot_names_the_entry_whose_number_does_not_fit(tmp_path, tokens):
    # Valid JSON whose whole-number field holds a fraction, an exponent or a number past 64 bits:
    # Foundation's decoder called it "not valid JSON" at the top level; the entry is named.
    engine = tmp_path / "engine.json"
    good = '{"name": "x", "ranks": 1, "tokens": 4, "dispatch": {"bytesPerRank": 1, "gbPerSecond": 1.0}}'
    bad = good.replace('"tokens": 4', '"tokens": ' + tokens)
    engine.write_text(f"[{good}, {bad}]")
    result = bench("plot", "--json", str(engine), "--out", str(tmp_path / "p.svg"))
    assert result.returncode == USAGE and "[1]: a number that does not fit its field" in result.stderr, result.stderr
    assert "not valid JSON" not in result.stderr


def test_plot_text_is_escaped(tmp_path):
    # A device name with XML's special characters still gives a parseable SVG that says it.
    engine = tmp_path / "engine.json"
    assert bench(*QUICK, "--case", "custom", "--tokens", "4", *PLOT_SHAPE, "--json", str(engine)).returncode == 0
    entries = json.loads(engine.read_text())
    for m in entries:
        m["device"] = m["run"]["device"] = 'A&B <"x">'
    engine.write_text(json.dumps(entries))
    out = tmp_path / "p.svg"
    assert bench("plot", "--json", str(engine), "--out", str(out)).returncode == 0
    root, series = plot_series(out)
    assert 'A&B <"x">' in root.find(SVG + "title").text
    assert all(len(points) == 1 for points in series.values())


def test_a_baseline_row_without_tokens_takes_the_standard_cases(tmp_path):
    # The Python bench writes no token count: a standard case's row is drawn at that case's tokens (ll-1: 1).
    engine = tmp_path / "engine.json"
    assert bench(*QUICK, "--case", "ll-1", *PLOT_SHAPE, "--json", str(engine)).returncode == 0
    (m,) = json.loads(engine.read_text())
    baseline = tmp_path / "py.json"
    baseline.write_text(json.dumps([{"case": "ll-1", "ranks": 2, "device": "cpu", "iterations": 5, "baseline": "torch",
                                     "baseline_dispatch_us": 20.0, "baseline_combine_us": 30.0}]))
    out = tmp_path / "p.svg"
    result = bench("plot", "--json", str(engine), "--baseline", str(baseline), "--out", str(out))
    assert result.returncode == 0, result.stderr
    root, series = plot_series(out)
    assert len(series) == 6 and all(len(points) == 1 for points in series.values())
    tips = {t.text for t in root.iter(SVG + "title") if t.text and t.text.startswith("torch combine")}
    assert tips == {f"torch combine: 1 tokens, {m['combine']['bytesPerRank'] / 30e3:.3f} GB/s"}
