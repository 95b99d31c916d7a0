"""NCCL ranks through the Python package: two processes (torchrun), one GPU each, build an
ep.NCCLGroup from their torch.distributed process group and match the CPU backend bit for bit
(python/tests/nccl_worker.py). Gated: set EP_NCCL_TESTS=1 on a machine with two GPUs, NCCL and
PyTorch (EP_NCCL_RANKS=4 or 8 runs that many ranks)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import expert_parallel as ep

NCCL = os.environ.get("EP_NCCL_TESTS") == "1"
pytestmark = pytest.mark.skipif(not NCCL, reason="needs 2 GPUs with NCCL and PyTorch: set EP_NCCL_TESTS=1")

WORKER = Path(__file__).resolve().with_name("nccl_worker.py")
RANKS = int(os.environ.get("EP_NCCL_RANKS", "2"))   # one process per GPU: 2, 4 or 8 (the cases' expert counts divide by them)
TIMEOUT = 540  # seconds for the whole run: kernels compile on first use


def test_two_nccl_ranks_match_the_cpu_backend_bit_for_bit():
    environment = dict(os.environ, NCCL_NVLS_ENABLE="0", EP_LIBRARY=str(ep.library_path()))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}", str(WORKER)]
    # A session of its own, so that a hung run is ended with every rank it started.
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the NCCL ranks did not finish within {TIMEOUT} s:\n{output[-8000:]}")
    assert process.returncode == 0, output[-8000:]
    for rank in range(RANKS):
        assert f"rank {rank} ok" in output, output[-8000:]
