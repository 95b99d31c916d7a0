"""The status of a failure below the library follows the library that failed (typed all the way
from the CUDA layer, never read from the message): NCCL → epNcclError, the CUDA driver →
epCudaError, each with the CUDA layer's own text. Needs no GPU; skipped where the library in
question is present."""

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import expert_parallel as ep
from expert_parallel import _abi
from expert_parallel._library import library_path, load

ROOT = Path(__file__).resolve().parents[2]


def unique_id_status():
    library = load()
    value = _abi.NCCLUniqueId()
    status = library.epGetNCCLUniqueId(ctypes.byref(value))
    return status, library.epGetLastErrorMessage().decode("utf-8", "replace")


def test_no_libnccl_is_an_nccl_error_listing_the_places_tried():
    status, message = unique_id_status()
    if status == _abi.SUCCESS:
        pytest.skip("NCCL is installed here")
    assert status == _abi.NCCL_ERROR, message
    assert message.startswith("epGetNCCLUniqueId: libnccl.so.2 is not available\n  tried:\n    "), message


def test_a_libnccl_without_nccl_symbols_is_an_nccl_error_naming_the_symbol():
    # libc opened as NCCL (EP_NCCL_PATH): it loads, but has no ncclGetVersion. NCCL is opened once
    # per process, so this runs in a process of its own.
    libc = ctypes.util.find_library("c")
    script = (
        "import ctypes\n"
        "from expert_parallel import _abi\n"
        "from expert_parallel._library import load\n"
        "library = load()\n"
        "value = _abi.NCCLUniqueId()\n"
        "status = library.epGetNCCLUniqueId(ctypes.byref(value))\n"
        "print(status)\n"
        "print(library.epGetLastErrorMessage().decode())\n"
    )
    env = dict(os.environ, EP_NCCL_PATH=libc or "libc.so.6", EP_LIBRARY=str(library_path()),
               PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    output = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    status, message = output.split("\n", 1)
    assert int(status) == _abi.NCCL_ERROR, message
    assert message.strip() == "epGetNCCLUniqueId: libnccl.so.2 has no symbol ncclGetVersion (is the library too old?)"


@pytest.mark.skipif(os.environ.get("EP_GPU_TESTS") == "1", reason="a machine without a GPU")
def test_no_cuda_driver_is_a_cuda_error_naming_libcuda():
    with pytest.raises(ep.CudaError) as raised:
        ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32", device="cuda:0")
    assert raised.value.status == _abi.CUDA_ERROR
    assert "libcuda.so.1 is not available" in str(raised.value) or "CUDA_ERROR_" in str(raised.value)
