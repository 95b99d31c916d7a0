"""Helpers for the tests of the scripts that read ep-bench's results (scripts/targets.py,
scripts/variants.py): the scripts loaded as modules, and result files written for them."""
import importlib.util
import io
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def script(name):
    """scripts/<name>.py as a module (variants.py imports targets.py from beside it)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(tmp_path, report_function, files, **options):
    """Each list of entries of `files` written as a result file; the report's exit status and lines."""
    paths = []
    for i, entries in enumerate(files):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(entries))
        paths.append(str(path))
    out = io.StringIO()
    status = report_function(paths, out, **options)
    return status, out.getvalue().splitlines()
