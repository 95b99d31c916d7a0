"""The package ships py.typed, so a user's type checker reads its signatures: what its docs show
users writing must type-check. mypy checks typed/usage.py (the documented calls: stacked tensors
where a per-rank argument is taken, the overlap arguments, handles as context managers, an
NCCLGroup's result, Exchange, the DeepEP adapter) against the package's hints. Before this test,
mypy refused the stacked call every doc leads with ("Argument 1 to "dispatch" of "VirtualGroup"
has incompatible type "Tensor"; expected "Sequence[Any]"") and an NCCLGroup result's
``expert_outputs``."""

import os
import subprocess
import sys

from conftest import ROOT

USAGE = ROOT / "python" / "tests" / "typed" / "usage.py"


def test_the_documented_calls_type_check_with_mypy(tmp_path):
    environment = dict(os.environ, PYTHONPATH=str(ROOT / "python"), MYPY_CACHE_DIR=str(tmp_path / "cache"))
    checked = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-incremental",
                              "--no-error-summary", str(USAGE)],
                             capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "", checked.stdout
