"""Packaging (issue 13, item 10): one version (the repository's VERSION file) for the Python
package and ep-bench; `pip install ./python` makes a platform wheel carrying
libexpert_parallel.so when one is built (EP_LIBRARY or ../.build/release/), a pure one without;
the package ships its type hints' marker. The wheel builds use pip (setuptools from PyPI, as
`pip install ./python` does) on a copy of python/, so the checkout gets no build files."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import expert_parallel as ep

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / "python"
VERSION = (ROOT / "VERSION").read_text(encoding="utf-8").strip()
LIBRARY_NAME = "libexpert_parallel.so"


def built_library():
    """The library this test run uses ($EP_LIBRARY or the checkout's release build), or None."""
    chosen = os.environ.get("EP_LIBRARY")
    path = Path(chosen) if chosen else ROOT / ".build" / "release" / LIBRARY_NAME
    path = path / LIBRARY_NAME if path.is_dir() else path
    return path if path.is_file() else None


# -- one version ------------------------------------------------------------------------------


def test_version_file_is_one_pep440_release():
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", VERSION), VERSION
    assert (ROOT / "VERSION").read_text(encoding="utf-8") == VERSION + "\n"


def test_package_version_is_the_version_file():
    assert ep.__version__ == VERSION
    assert "__version__" in ep.__all__


def test_ep_bench_version_constant_is_the_version_file():
    source = (ROOT / "Sources" / "ep-bench" / "Version.swift").read_text(encoding="utf-8")
    constants = re.findall(r'^let expertParallelVersion = "([^"]*)"$', source, re.MULTILINE)
    assert constants == [VERSION], "Sources/ep-bench/Version.swift must hold the VERSION file's version"
    command = (ROOT / "Sources" / "ep-bench" / "EPBench.swift").read_text(encoding="utf-8")
    assert "version: expertParallelVersion," in command


def test_ep_bench_reports_the_version():
    """The built ep-bench (CI builds it: `swift build --build-tests` in .ci/run)."""
    binaries = [path for path in (ROOT / ".build" / "debug" / "ep-bench", ROOT / ".build" / "release" / "ep-bench")
                if path.is_file()]
    if not binaries:
        pytest.skip("ep-bench is not built (swift build --product ep-bench)")
    for binary in binaries:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == VERSION, (
            f"{binary} --version says {result.stdout.strip()!r}, VERSION says {VERSION!r} (rebuild it if it is stale)")


# -- setup.py's choices -------------------------------------------------------------------------


def load_setup(monkeypatch, environ):
    """python/setup.py as a module (its setup() call runs only as __main__), under `environ`."""
    monkeypatch.delenv("EP_LIBRARY", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("ep_setup", PYTHON / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_reads_the_version_file(monkeypatch):
    assert load_setup(monkeypatch, {}).VERSION == VERSION


def test_setup_finds_the_library(monkeypatch, tmp_path):
    setup = load_setup(monkeypatch, {})
    library = tmp_path / "lib" / LIBRARY_NAME
    library.parent.mkdir()
    library.write_bytes(b"\x7fELF")
    checkout, sources = tmp_path / "checkout", tmp_path / "checkout" / "python"
    (sources / "expert_parallel").mkdir(parents=True)
    find = setup.find_library
    assert find({}, checkout, sources) is None  # nothing built: a pure wheel
    assert find({"EP_LIBRARY": str(library)}, checkout, sources) == library  # the file
    assert find({"EP_LIBRARY": str(library.parent)}, checkout, sources) == library  # its folder
    with pytest.raises(SystemExit, match="EP_LIBRARY=.*is not a file"):
        find({"EP_LIBRARY": str(tmp_path / "missing.so")}, checkout, sources)
    release = checkout / ".build" / "release" / LIBRARY_NAME
    release.parent.mkdir(parents=True)
    release.write_bytes(b"\x7fELF")
    assert find({}, checkout, sources) == release  # the checkout's release build
    assert find({"EP_LIBRARY": str(library)}, checkout, sources) == library  # EP_LIBRARY first


# -- wheels -------------------------------------------------------------------------------------


def copy_sources(tmp_path):
    """python/, VERSION and LICENSE as a checkout with nothing built."""
    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests", "*.so")
    shutil.copytree(PYTHON, checkout / "python", ignore=ignore)
    for name in ("VERSION", "LICENSE"):
        shutil.copyfile(ROOT / name, checkout / name)
    return checkout / "python"


def build_wheel(sources, out, environ):
    env = {key: value for key, value in os.environ.items() if key != "EP_LIBRARY"}
    env.update(environ)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(out),
         str(sources)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def wheel_tag(wheel):
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"expert_parallel-{VERSION}.dist-info/WHEEL").decode()
    return re.findall(r"^Tag: (.*)$", metadata, re.MULTILINE), "Root-Is-Purelib: true" in metadata


def install(wheel, target):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q", "--target",
         str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def run_installed(site, cwd, environ, code):
    env = {key: value for key, value in os.environ.items() if key not in ("EP_LIBRARY", "PYTHONPATH")}
    env.update(environ, PYTHONPATH=str(site))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()


CHECK = """
import expert_parallel as ep, numpy as np
group = ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=1, dtype="f32")
xs = [np.full((1, 8), 1.0, np.float32), np.full((1, 8), 2.0, np.float32)]
out = group.dispatch(xs, [np.array([[0, 3]], np.int32)] * 2, [np.array([[0.25, 0.5]], np.float32)] * 2)
print(ep.__version__, ep.__file__, ep.library_path(), group.combine(out.tokens, out.handle)[1][0, 0])
"""


def test_wheel_with_the_library_is_platform_specific_and_runs_without_ep_library(tmp_path):
    library = built_library()
    if library is None:
        pytest.skip("libexpert_parallel.so is not built")
    wheel = build_wheel(copy_sources(tmp_path), tmp_path / "wheels", {"EP_LIBRARY": str(library)})
    tags, pure = wheel_tag(wheel)
    assert not pure and len(tags) == 1 and tags[0].startswith("py3-none-") and tags[0] != "py3-none-any", tags
    assert wheel.name == f"expert_parallel-{VERSION}-{tags[0]}.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert archive.getinfo(f"expert_parallel/{LIBRARY_NAME}").file_size == library.stat().st_size
        assert archive.read("expert_parallel/VERSION").decode().strip() == VERSION
    assert {"expert_parallel/py.typed", "expert_parallel/LICENSE", "expert_parallel/__init__.py"} <= names

    site = tmp_path / "site"
    install(wheel, site)
    version, package, found, value = run_installed(site, tmp_path, {}, CHECK)  # no EP_LIBRARY
    assert version == VERSION
    assert Path(package).parent == site / "expert_parallel"
    assert Path(found) == site / "expert_parallel" / LIBRARY_NAME
    assert float(value) == 1.5


def test_wheel_without_a_library_is_pure_and_finds_it_through_ep_library(tmp_path):
    wheel = build_wheel(copy_sources(tmp_path), tmp_path / "wheels", {})
    tags, pure = wheel_tag(wheel)
    assert pure and tags == ["py3-none-any"], tags
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert archive.read("expert_parallel/VERSION").decode().strip() == VERSION
    assert f"expert_parallel/{LIBRARY_NAME}" not in names
    assert "expert_parallel/py.typed" in names
    assert {"expert_parallel/compat/__init__.py", "expert_parallel/compat/deep_ep/_buffer.py"} <= names   # the adapters
    assert "expert_parallel/torch/_ops.py" in names   # the autograd and torch.library ops

    library = built_library()
    if library is None:
        return
    site = tmp_path / "site"
    install(wheel, site)
    version, _, found, value = run_installed(site, tmp_path, {"EP_LIBRARY": str(library)}, CHECK)
    assert version == VERSION and Path(found) == library and float(value) == 1.5


# -- type hints ---------------------------------------------------------------------------------


def test_the_package_is_typed():
    assert (PYTHON / "expert_parallel" / "py.typed").is_file()
    assert 'expert_parallel = ["py.typed"]' in (PYTHON / "pyproject.toml").read_text(encoding="utf-8")
    import inspect
    import typing

    for function in (ep.VirtualGroup.__init__, ep.VirtualGroup.dispatch, ep.VirtualGroup.combine,
                     ep.VirtualGroup.clean, ep.NCCLGroup.__init__, ep.NCCLGroup.dispatch, ep.NCCLGroup.combine,
                     ep.NCCLGroup.update, ep.nccl_unique_id, ep.library_path):
        signature = inspect.signature(function)
        for name, parameter in signature.parameters.items():
            if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                assert parameter.annotation is not parameter.empty, f"{function.__qualname__}({name})"
        assert signature.return_annotation is not signature.empty, function.__qualname__
        typing.get_type_hints(function)  # every annotation resolves
    hints = typing.get_type_hints(ep.VirtualGroup.__init__)
    assert typing.get_args(hints["algorithm"]) == ("ll", "ht")
