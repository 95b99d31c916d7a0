"""examples/megatron_dispatcher.py runs on the CPU and matches the dense layer, outputs and gradients."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "megatron_dispatcher.py"


def test_the_example_runs_as_a_script():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(EXAMPLE), "--ranks", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: 4 ranks, outputs and gradients within")


def test_the_example_matches_the_dense_layer_on_other_shapes():
    spec = importlib.util.spec_from_file_location("megatron_dispatcher", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(ranks=2, experts=6, hidden=16, top_k=3, tokens=9, seed=3) <= 1e-3
    assert module.main(ranks=8, experts=16, hidden=8, top_k=4, tokens=3, seed=4) <= 1e-3
