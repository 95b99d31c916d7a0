"""The package's version, from the project's one VERSION file: the copy that ``pip install``
puts in the package, or the repository's VERSION when the package runs from a source checkout.
``ep-bench --version`` reports the same (Sources/ep-bench/Version.swift; checked by
python/tests/test_packaging.py)."""

from pathlib import Path


def read_version() -> str:
    here = Path(__file__).resolve().parent
    for path in (here / "VERSION", here.parent.parent / "VERSION"):
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if text:
            return text
    try:  # installed without the file (it should not happen): the distribution's metadata
        from importlib.metadata import version

        return version("expert_parallel")
    except Exception:
        return "0+unknown"


__version__ = read_version()
