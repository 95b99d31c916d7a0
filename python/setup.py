"""Builds the expert_parallel package (metadata in pyproject.toml; `pip install ./python`).

What this adds to setuptools' build:

- the version, read from the repository's VERSION file (the single source shared with
  `ep-bench --version`); the built package carries a copy, which expert_parallel.__version__ reads;
- libexpert_parallel.so, when one is found: $EP_LIBRARY (the file, or a folder holding it), else
  the checkout's ../.build/release/libexpert_parallel.so, else a copy already next to the package
  sources (python/expert_parallel/). It is copied into the built package and the wheel is tagged
  for this platform (py3-none-<platform>, not py3-none-any): the package then needs no EP_LIBRARY.
  Without one the wheel is pure Python and the package finds the library at run time
  ($EP_LIBRARY, see expert_parallel/_library.py). The library is never built here: build it with
  `scripts/build-library` first.
- expert_parallel._torch_fast, the common calls' torch tensors read in C++ (_torch_fast.cpp),
  when torch is importable where the build runs (`pip install --no-build-isolation ./python`, or
  in place: scripts/build-torch-fast) and EP_TORCH_FAST is not 0. It is built against that torch
  and tags the wheel for this Python; without it the package takes its Python path.
"""

import os
import shutil
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:  # older setuptools with the wheel package
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:
        bdist_wheel = None

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGE = "expert_parallel"
LIBRARY_NAME = "libexpert_parallel.so"


def find_library(environ=os.environ, root=ROOT, here=HERE):
    """The libexpert_parallel.so to ship, or None. An EP_LIBRARY that names no library is an error:
    an explicit choice is never replaced by another library."""
    chosen = environ.get("EP_LIBRARY")
    if chosen:
        path = Path(chosen)
        path = path / LIBRARY_NAME if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"EP_LIBRARY={chosen}: {path} is not a file; build the library or unset EP_LIBRARY")
        return path.resolve()
    for path in (root / ".build" / "release" / LIBRARY_NAME, here / PACKAGE / LIBRARY_NAME):
        if path.is_file():
            return path.resolve()
    return None


def read_version(root=ROOT, here=HERE):
    """The repository's VERSION (or, building from an sdist, the version in its PKG-INFO)."""
    version_file = root / "VERSION"
    if version_file.is_file():
        return version_file.read_text(encoding="utf-8").strip()
    pkg_info = here / "PKG-INFO"
    if pkg_info.is_file():
        for line in pkg_info.read_text(encoding="utf-8").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    raise SystemExit(f"{version_file} not found: build from the repository (pip >= 21.3 builds ./python in place)")


def torch_extension(environ=os.environ):
    """(the extension, torch's build_ext) for _torch_fast, or None: EP_TORCH_FAST=0, or no torch
    here (pip's isolated build environment has none: --no-build-isolation builds it)."""
    if environ.get("EP_TORCH_FAST") == "0":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return None
    # optional: without a C++ compiler or Python's headers the package installs without it. The
    # torch it was built against goes into the module, which the package compares with the torch
    # it runs with (_fast.torch_fast_module): torch's tensor layout is read inline, not linked.
    extension = CppExtension(f"{PACKAGE}._torch_fast", [f"{PACKAGE}/_torch_fast.cpp"], optional=True,
                             extra_compile_args=["-O2", f'-DEP_TORCH_VERSION="{torch.__version__}"'])
    return extension, BuildExtension


LIBRARY = find_library()
VERSION = read_version()
TORCH_EXTENSION = torch_extension()


class BuildPy(build_py):
    """Puts VERSION, LICENSE and the library (when found) into the built package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install runs from the sources: VERSION and .build/release are found there
        target = Path(self.build_lib) / PACKAGE
        target.mkdir(parents=True, exist_ok=True)
        (target / "VERSION").write_text(VERSION + "\n", encoding="utf-8")
        if (ROOT / "LICENSE").is_file():
            shutil.copyfile(ROOT / "LICENSE", target / "LICENSE")
        shipped = target / LIBRARY_NAME
        if LIBRARY is None:
            if shipped.exists():
                shipped.unlink()  # a copy left in build/ by an earlier build with a library
            self.announce(f"{PACKAGE}: no {LIBRARY_NAME} to ship (EP_LIBRARY unset, none in "
                          f"{ROOT / '.build' / 'release'}): a pure-Python wheel, the library found at run time", 2)
        else:
            self.announce(f"{PACKAGE}: shipping {LIBRARY}", 2)
            shutil.copyfile(LIBRARY, shipped)
            shipped.chmod(0o755)


class LibraryDistribution(Distribution):
    """With the library the package is platform-specific: installed into platlib (as a package
    with an extension module would be), its wheel not pure."""

    def has_ext_modules(self):
        return LIBRARY is not None or TORCH_EXTENSION is not None


commands = {"build_py": BuildPy}
if TORCH_EXTENSION is not None:
    commands["build_ext"] = TORCH_EXTENSION[1].with_options(use_ninja=False)

if bdist_wheel is not None:
    class PlatformWheel(bdist_wheel):
        """A wheel that carries the library is tagged py3-none-<this platform>: any Python 3 (the
        package uses ctypes only) on this platform."""

        def get_tag(self):
            python, abi, platform = super().get_tag()
            if LIBRARY is not None and TORCH_EXTENSION is None:   # (an extension module: this Python's tags)
                return "py3", "none", platform
            return python, abi, platform

    commands["bdist_wheel"] = PlatformWheel

if __name__ == "__main__":
    setup(version=VERSION, cmdclass=commands, distclass=LibraryDistribution,
          ext_modules=[] if TORCH_EXTENSION is None else [TORCH_EXTENSION[0]])
