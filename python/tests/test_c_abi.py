"""The C ABI itself: a C program compiled against include/expert_parallel.h runs a CPU step and
error paths (Tests/c/abi_smoke.c); the ctypes mirrors have the C compiler's struct sizes; the
header compiles as C++; the library needs only the C and C++ runtimes."""

import ctypes
import shutil
import subprocess

import pytest

import expert_parallel as ep
from expert_parallel import _abi
from conftest import ROOT

HEADER_DIR = ROOT / "include"
SMOKE = ROOT / "Tests" / "c" / "abi_smoke.c"


def compiler(*names):
    for name in names:
        if shutil.which(name):
            return name
    pytest.skip(f"no C compiler ({', '.join(names)})")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    cc = compiler("cc", "gcc", "clang")
    library = ep.library_path()
    binary = tmp_path_factory.mktemp("abi") / "abi_smoke"
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-pthread", f"-I{HEADER_DIR}",
                    str(SMOKE), f"-L{library.parent}", "-lexpert_parallel", f"-Wl,-rpath,{library.parent}",
                    "-o", str(binary)], check=True, capture_output=True, text=True)
    return binary


def test_c_program_runs_a_step_and_its_error_paths(smoke):
    run = subprocess.run([str(smoke)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert ", 0 failed" in run.stdout


def test_ctypes_structs_match_the_c_compiler(smoke):
    run = subprocess.run([str(smoke), "sizes"], capture_output=True, text=True, check=True)
    sizes = dict(line.split() for line in run.stdout.splitlines())
    assert set(sizes) == set(_abi.STRUCTS)
    for name, cls in _abi.STRUCTS.items():
        assert ctypes.sizeof(cls) == int(sizes[name]), name


def test_header_compiles_as_cxx(tmp_path):
    cxx = compiler("c++", "g++", "clang++")
    source = tmp_path / "use.cpp"
    source.write_text('#include "expert_parallel.h"\nint main() { int32_t v = 0; return epGetAbiVersion(&v); }\n')
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{HEADER_DIR}", "-fsyntax-only",
                    str(source)], check=True, capture_output=True, text=True)


def test_library_needs_only_the_c_and_cxx_runtimes():
    if not shutil.which("ldd"):
        pytest.skip("no ldd")
    output = subprocess.run(["ldd", str(ep.library_path())], capture_output=True, text=True, check=True).stdout
    allowed = ("linux-vdso", "libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "ld-linux", "libdl.so",
               "libpthread.so", "librt.so")
    needed = [line.split()[0] for line in output.splitlines() if line.strip()]
    assert needed and all(name.startswith(allowed) or "/ld-linux" in name for name in needed), output


def test_every_entry_point_is_exported():
    library = ctypes.CDLL(str(ep.library_path()))
    for name in [*_abi.PROTOTYPES, "epGetErrorString", "epGetLastErrorMessage"]:
        assert hasattr(library, name), name


def test_only_the_c_abi_is_exported():
    """scripts/build-library links with scripts/library-exports.map: the library's Swift symbols,
    the driver shim's helpers and the statically linked runtime's (libdispatch's thread-local) are
    not there for another library of the process to bind to."""
    library = ctypes.CDLL(str(ep.library_path()))
    for name in ("ep_shim_user_id", "ep_shim_unix_listen", "__dispatch_tsd", "$s14ExpertParallel7EPErrorON",
                 "swift_retain", "dispatch_async"):
        assert not hasattr(library, name), f"{name} is exported; build the library with scripts/build-library"
    if shutil.which("readelf"):
        table = subprocess.run(["readelf", "--dyn-syms", "-W", str(ep.library_path())], capture_output=True, text=True,
                               check=True).stdout
        exported = {fields[7] for fields in (line.split() for line in table.splitlines())
                    if len(fields) >= 8 and fields[4] in ("GLOBAL", "WEAK") and fields[6] != "UND"}
        assert exported and all(name.startswith("ep") and name[2:3].isupper() for name in exported), sorted(exported)[:20]


@pytest.mark.parametrize("size", [2**64 - 1, 2**63])
def test_a_struct_size_past_int64_is_named_as_the_caller_wrote_it(size):
    """structSize is a size_t: the error names the value the caller passed, not its bits read as
    a signed integer (SIZE_MAX read "config.structSize = -1")."""
    library = ep._library.load()
    config = _abi.GroupConfig(structSize=size)
    group = ctypes.c_void_p()
    assert library.epGroupCreate(ctypes.byref(config), None, ctypes.byref(group)) == 1
    message = library.epGetLastErrorMessage().decode()
    assert f"config.structSize = {size};" in message, message
    updates = (_abi.UpdateInputs * 2)(_abi.UpdateInputs(structSize=ctypes.sizeof(_abi.UpdateInputs)),
                                      _abi.UpdateInputs(structSize=size))
    config = _abi.GroupConfig(structSize=ctypes.sizeof(_abi.GroupConfig), ranks=2, experts=2, topK=1, hidden=8,
                              elementType=2, maxTokensPerRank=1)
    assert library.epGroupCreate(ctypes.byref(config), None, ctypes.byref(group)) == 0
    try:
        assert library.epGroupUpdateAll(group, updates, None, None) == 1
        message = library.epGetLastErrorMessage().decode()
        assert f"inputs[1].structSize = {size};" in message, message
    finally:
        library.epGroupDestroy(group)
