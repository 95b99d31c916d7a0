"""ep-bench's command line: every numeric option is range-checked with a message naming the
option, the value and the bound (exit status 64, never a trap), and a --json path that cannot be
written fails before the run starts. Runs the debug ep-bench that `swift build --build-tests`
leaves in .build/debug (CI builds it before scripts/test), or $EP_BENCH."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(os.environ.get("EP_BENCH", ROOT / ".build" / "debug" / "ep-bench"))

pytestmark = pytest.mark.skipif(not BENCH.is_file(), reason=f"no ep-bench at {BENCH} (swift build --build-tests)")

USAGE = 64  # ArgumentParser's exit status for a bad command line (EX_USAGE)


def bench(*args, timeout=120):
    # CPU only: the run must not depend on a GPU (and is fast on ll-1).
    return subprocess.run([str(BENCH), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "EP_CUDA_DRIVER_PATH": "/nonexistent"})


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
