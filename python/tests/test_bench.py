"""The Python benchmark's small CPU run (CI): every figure it reports is there and positive, the
engine's figures are matched by case and ranks, and bad options are refused by name."""

import json
import os
import subprocess
import sys

import pytest

from expert_parallel import bench


def test_a_small_cpu_run_reports_host_and_baseline_times(tmp_path):
    out = tmp_path / "py.json"
    assert bench.main(["--device", "cpu", "--case", "tiny", "--case", "tiny-ht", "--iterations", "3", "--warmup", "1",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["case"] for row in rows] == ["tiny", "tiny-ht"]
    for row in rows:
        assert row["device"] == "cpu" and row["iterations"] == 3
        for key in ["host_dispatch_us", "host_combine_us", "baseline_dispatch_us", "baseline_combine_us"]:
            assert row[key] > 0, key
        assert "gpu_dispatch_us" not in row   # no CUDA events on the CPU


def test_a_deepep_run_times_the_compat_buffer_at_one_rank(tmp_path):
    out = tmp_path / "py.json"
    assert bench.main(["--deepep", "--case", "tiny", "--case", "tiny-ht", "--iterations", "3", "--warmup", "1",
                       "--no-baseline", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(row["case"], row["ranks"], row["group"]) for row in rows] == [("tiny", 1, "deep_ep.Buffer"), ("tiny-ht", 1, "deep_ep.Buffer")]
    assert all(row["host_dispatch_us"] > 0 and row["host_combine_us"] > 0 for row in rows)
    import torch.distributed as dist

    assert not dist.is_initialized()   # the run's process group of one is gone


@pytest.mark.parametrize("fill", ["zero-fill", "no-fill"])
def test_an_exchange_run_times_the_autograd_ops(tmp_path, fill):
    out = tmp_path / "py.json"
    assert bench.main(["--exchange", fill, "--case", "tiny", "--case", "tiny-ht", "--iterations", "3", "--warmup", "1",
                       "--no-baseline", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(row["case"], row["ranks"], row["group"]) for row in rows] == [("tiny", 2, f"Exchange ({fill})"),
                                                                           ("tiny-ht", 2, f"Exchange ({fill})")]
    assert all(row["host_dispatch_us"] > 0 and row["host_combine_us"] > 0 for row in rows)


def test_the_engines_figures_are_matched_by_case_and_ranks(tmp_path):
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps([
        {"name": "tiny", "ranks": 2, "dispatch": {"median": 1.5}, "combine": {"median": 2.5}},
        {"name": "tiny", "ranks": 4, "dispatch": {"median": 9.0}, "combine": {"median": 9.0}},
    ]))
    rows = bench.run(["tiny"], "cpu", None, 2, 0, 1, str(engine), baseline=False)
    assert rows[0]["engine_dispatch_us"] == 1.5 and rows[0]["engine_combine_us"] == 2.5
    assert "baseline_dispatch_us" not in rows[0]
    assert "engine d µs" in bench.render(rows) and "1.5" in bench.render(rows)


def test_the_engines_dispatch_includes_its_update(tmp_path):
    # The package's dispatch (given topk_idx) runs the update too: the engine figure beside it does.
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps([{"name": "tiny", "ranks": 2, "update": {"median": 4.0}, "dispatch": {"median": 1.5},
                                   "combine": {"median": 2.5}}]))
    rows = bench.run(["tiny"], "cpu", None, 2, 0, 1, str(engine), baseline=False)
    assert rows[0]["engine_dispatch_us"] == 5.5 and rows[0]["engine_combine_us"] == 2.5


def test_an_nccl_run_takes_the_engines_nccl_rank_figures(tmp_path):
    # ep-bench --transport nccl writes one entry per rank (rank 0, 1, ...); the virtual groups' have no rank.
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps([
        {"name": "ll-std", "ranks": 1, "dispatch": {"median": 9.0}, "combine": {"median": 9.0}},
        {"name": "ll-std", "ranks": 1, "rank": 0, "update": {"median": 4.0}, "dispatch": {"median": 10.0},
         "combine": {"median": 11.0}},
    ]))
    assert bench._engine_figures(str(engine), nccl=True) == {("ll-std", 1): {"engine_dispatch_us": 14.0, "engine_combine_us": 11.0}}
    assert bench._engine_figures(str(engine)) == {("ll-std", 1): {"engine_dispatch_us": 9.0, "engine_combine_us": 9.0}}


@pytest.mark.parametrize("option", [["--iterations", "0"], ["--warmup", "-1"], ["--ranks", "0"], ["--case", "nope"],
                                    ["--nccl"], ["--nccl", "--device", "cuda:0", "--ranks", "2"], ["--deepep", "--ranks", "2"],
                                    ["--deepep", "--nccl", "--device", "cuda:0"], ["--exchange", "maybe"],
                                    ["--exchange", "no-fill", "--deepep"], ["--ranks", "3"], ["--device", "gpu"],
                                    ["--json", "/nonexistent/x.json"], ["--engine-json", "/nonexistent.json"]]
                         + ([["--device", "cuda:0"]] if not __import__("torch").cuda.is_available() else []))
def test_bad_options_are_refused_by_name(option):
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(bench.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "expert_parallel.bench", *option], capture_output=True, text=True, env=env)
    assert run.returncode == 2
    assert option[0] in run.stderr


def test_an_nccl_rank_of_a_job_draws_its_own_part_of_the_step():
    # Under torchrun every rank draws the whole step from the seed and keeps its own part.
    case = bench.CASES["tiny"]
    whole, mine = bench._Inputs(case, 3, "cpu", 5), bench._Inputs(case, 3, "cpu", 5, keep=2)
    for a, b in ((whole.x[2], mine.x[0]), (whole.idx[2], mine.idx[0]), (whole.w[2], mine.w[0])):
        assert (a == b).all()
    assert len(mine.x) == 1 and mine.stacked[0].shape == (1,) + whole.x[2].shape
    assert not (whole.x[1] == mine.x[0]).all()


def test_a_job_rank_takes_its_own_entries_of_the_engines_json(tmp_path):
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps([
        {"name": "ll-std", "ranks": 2, "rank": r, "updateDispatch": {"median": 20.0 + r}, "update": {"median": 4.0},
         "dispatch": {"median": 30.0}, "combine": {"median": 25.0 + r}} for r in (0, 1)]))
    assert bench._engine_figures(str(engine), nccl=True, rank=1) == {("ll-std", 2): {"engine_dispatch_us": 21.0, "engine_combine_us": 26.0}}
    assert bench._engine_figures(str(engine), nccl=True) == {("ll-std", 2): {"engine_dispatch_us": 20.0, "engine_combine_us": 25.0}}


def test_a_job_is_read_from_torchruns_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert bench.torchrun_job() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert bench.torchrun_job() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert bench.torchrun_job() == (3, 4)
    assert bench._job_device("cuda") == "cuda:1" and bench._job_device("cuda:5") == "cuda:5"


def test_every_ranks_rows_are_reported_by_case_then_rank():
    gathered = [[{"case": c, "rank": r} for c in ("a", "b")] for r in range(3)]
    assert [(row["case"], row["rank"]) for row in bench._by_case(gathered)] == [
        ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    table = bench.render([{"case": "a", "ranks": 3, "rank": 2, "host_dispatch_us": 1.0}])
    assert table.splitlines()[0].split()[:3] == ["case", "R", "rank"] and table.splitlines()[1].split()[:4] == ["a", "3", "2", "1.0"]


def test_under_torchrun_an_nccl_run_takes_the_jobs_ranks():
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(bench.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""), WORLD_SIZE="2", RANK="1")
    run = subprocess.run([sys.executable, "-m", "expert_parallel.bench", "--nccl", "--device", "cuda", "--ranks", "3"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "--ranks 3" in run.stderr and "job's 2" in run.stderr


def test_without_numpy_the_bench_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numpy" else find_spec(name, *a))
    assert bench.main(["--device", "cpu", "--case", "tiny"]) == 2
    assert "needs NumPy (pip install numpy" in capsys.readouterr().err
