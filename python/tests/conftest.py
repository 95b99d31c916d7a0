"""Tests of the expert_parallel package, run from the source tree (python/ goes first on the
path). The library comes from $EP_LIBRARY or the repository's .build/release/."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
