"""What the measurement tools read: the Python bench's engine figure is the ep-bench run of its
case as the package runs it (`odd`'s LL variant, uniform routing, the case's shape; several runs'
median), and scripts/targets.py refuses a JSON of another shape with exit status 2 (1 means a
target missed) and gives no verdict on a card that is not an H200 (a GH200 either)."""

import importlib.util
import io
import json
from pathlib import Path

import pytest

from expert_parallel import bench

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("targets_script", ROOT / "scripts" / "targets.py")
targets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(targets)


# --- python -m expert_parallel.bench --engine-json ------------------------------------------------

def test_the_engine_figure_of_odd_is_its_ll_variant(tmp_path):
    # `ep-bench run --backend gpu` (no --case) runs `odd` twice: its LL and its HT variant, both named
    # "odd" with 6 ranks (Sources/ep-bench/BenchCase.swift). The package's "odd" is LL.
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps([
        {"name": "odd", "algorithm": "ll", "ranks": 6, "updateDispatch": {"median": 20.0},
         "dispatch": {"median": 18.0}, "update": {"median": 5.0}, "combine": {"median": 15.0}},
        {"name": "odd", "algorithm": "ht", "ranks": 6, "updateDispatch": None,
         "dispatch": {"median": 300.0}, "update": {"median": 10.0}, "combine": {"median": 250.0}},
    ]))
    rows = bench.run(["odd"], "cpu", None, 1, 0, 1, str(engine), baseline=False)
    assert (rows[0]["engine_dispatch_us"], rows[0]["engine_combine_us"]) == (20.0, 15.0)


@pytest.mark.parametrize("options", [{"skew": 1}, {"skew": 0, "tokens": 64, "tokenCounts": [64]},
                                     {"skew": 0, "hidden": 4096}])
def test_an_engine_run_of_another_routing_or_shape_is_not_the_cases_figure(tmp_path, options):
    # device-verify targets' JSON has ht-std at skew 0 and then at skew 1 under the same (name, ranks);
    # the package always runs the standard shape with uniform routing.
    engine = tmp_path / "engine.json"
    standard = {"skew": 0, "tokens": None, "hidden": None, "tokenCounts": []}
    engine.write_text(json.dumps([
        {"name": "tiny", "algorithm": "ll", "ranks": 2, "run": {"options": standard},
         "dispatch": {"median": 1.5}, "combine": {"median": 2.5}},
        {"name": "tiny", "algorithm": "ll", "ranks": 2, "run": {"options": {**standard, **options}},
         "dispatch": {"median": 9.0}, "combine": {"median": 9.0}},
    ]))
    assert bench._engine_figures(str(engine)) == {("tiny", 2): {"engine_dispatch_us": 1.5, "engine_combine_us": 2.5}}


# --- scripts/targets.py ---------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    [1, 2],                                                                  # not objects
    [[{"name": "ll-std", "ranks": 8}]],                                     # one level too deep
    [{"name": "ll-std", "ranks": 8, "backend": "gpu", "device": "NVIDIA H200", "step": {"median": "70"}}],
    [{"name": "ll-std", "ranks": 8, "backend": "gpu", "device": None, "step": {"median": 70}}],
    [{"case": "ll-std", "ranks": 8, "device": "cuda:0", "host_dispatch_us": 9.0}],   # python -m expert_parallel.bench --json
])
def test_targets_refuses_a_json_of_another_shape_with_exit_status_2(tmp_path, capsys, content):
    # Exit status 1 means "a target missed (on an H200)"; a traceback's 1 reads the same.
    path = tmp_path / "other.json"
    path.write_text(json.dumps(content))
    assert targets.main([str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_targets_gives_no_verdict_on_a_gh200(tmp_path):
    # A GH200 (Grace Hopper; its GPU is not an H200) contains "H200" in its name.
    path = tmp_path / "run.json"
    path.write_text(json.dumps([{"name": "ll-std", "ranks": 8, "backend": "gpu", "device": "NVIDIA GH200 480GB",
                                 "fp8": None, "fp8Source": None, "run": {"options": {"skew": 0}},
                                 "step": {"median": 99.0}}]))
    out = io.StringIO()
    status = targets.report([str(path)], out)
    assert "NOT MET" not in out.getvalue() and "no verdict" in out.getvalue()
    assert status == 0
