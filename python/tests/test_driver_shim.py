"""scripts/driver-shim.py, the stand-in libcuda that times the library's driver calls: it covers every
driver entry point the library looks up, and over a made-up driver it forwards the arguments and
results and reports each function's calls."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("driver_shim", ROOT / "scripts" / "driver-shim.py")
shim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shim)

# A C compiler: the Swift toolchain that builds the library brings clang.
CC = shutil.which("cc") or shutil.which("clang")

FAKE_DRIVER = """
int cuInit(unsigned flags) { return (int)flags; }
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void* stream, void** params, void** extra) {
    return (int)(gx + gy + gz + bx + by + bz + shared) + (stream ? 1000 : 0) + (extra ? 2000 : 0);
}
int cuLaunchKernelEx(const void* config, void* f, void** params, void** extra) { return config ? 3000 : 0; }
"""


def test_every_driver_function_the_library_loads_is_covered():
    names = shim.driver_symbols()
    declared = set(re.findall(r'"(cu[A-Za-z0-9_]+)"', (ROOT / "Sources/ExpertParallelCUDA/DriverFunctions.swift").read_text()))
    assert declared and declared <= set(names)
    for name in ["cuLaunchKernel", "cuLaunchKernelEx", "cuMemAlloc_v2", "cuFuncLoad", "cuIpcOpenMemHandle_v2", "cuMemMap"]:
        assert name in names
    text = shim.source(names)
    for name in names:
        assert re.search(rf"^int {name}\(", text, re.M), name


def test_the_shim_forwards_and_reports(tmp_path):
    assert CC, "no C compiler (cc or clang) on PATH"
    (tmp_path / "fake.c").write_text(FAKE_DRIVER)
    fake = tmp_path / "libfake.so"
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(fake), str(tmp_path / "fake.c")], check=True)
    built = tmp_path / "shim.so"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "driver-shim.py"), "--out", str(built), "--cc", CC], check=True,
                   stdout=subprocess.DEVNULL)
    report = tmp_path / "calls.txt"
    program = f"""
import ctypes
lib = ctypes.CDLL({str(built)!r})
launch = lib.cuLaunchKernel
launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
results = [launch(None, 1, 2, 3, 4, 5, 6, 7, 8, None, None), launch(None, 1, 1, 1, 1, 1, 1, 0, None, None, 9)]
print(results, lib.cuLaunchKernelEx(1, None, None, None), lib.cuInit(5), lib.cuMemAlloc_v2(None, 1))
"""
    env = dict(os.environ, SHIM_REAL=str(fake), SHIM_OUT=str(report))
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True).stdout
    # Arguments and results pass through; a function the real driver lacks answers CUDA_ERROR_NOT_FOUND.
    assert out.split() == ["[1028,", "2006]", "3000", "5", "500"]
    lines = report.read_text().splitlines()
    assert any(re.match(r"cuLaunchKernel\s+2 calls\s+[\d.]+ us mean", line) for line in lines), lines
    assert any(re.match(r"cuInit\s+1 calls", line) for line in lines), lines
    assert any(re.match(r"cuLaunchKernelEx\s+1 calls", line) for line in lines), lines
    assert any(line.startswith("launches: 3, median") for line in lines), lines   # both launch calls in the median
    assert not any(line.startswith("cuMemAlloc_v2") for line in lines)   # never reached the driver: not counted
