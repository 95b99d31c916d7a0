"""scripts/targets.py: which ep-bench entries each performance target reads, the verdict on an
H200 and its absence on another card, and its exit status."""
import json

from bench_results import report, script

targets = script("targets")


def phase(median, graph=None, percent=None):
    p = {"median": median, "minimum": median, "maximum": median}
    if graph is not None:
        p["graphMicroseconds"] = graph
    if percent is not None:
        p["percentOfFloor"] = percent
    return p


def entry(name, ranks, device="NVIDIA H200", fp8=None, source=None, skew=0, options=None, **phases):
    e = {"name": name, "ranks": ranks, "backend": "gpu", "device": device, "fp8": fp8, "fp8Source": source,
         "run": {"options": {"skew": skew, "dtype": "bf16", "sms": [], "pipelineDepth": 4, "layout": None, **(options or {})}}}
    e.update(phases)
    return e


def run(tmp_path, *files, defines=None):
    status, lines = report(tmp_path, targets.report, files, defines=defines)
    return status, {line.split("  ")[0].strip(): line for line in lines}


def test_a_step_under_its_bound_is_met_and_one_over_it_is_not(tmp_path):
    status, lines = run(tmp_path, [entry("ll-std", 8, step=phase(74.0, 70.0)), entry("ht-4k", 8, step=phase(901.0), update=phase(17.0))])
    assert "met" in lines["ll-std step, 8 virtual"] and "74.00 [70.00]" in lines["ll-std step, 8 virtual"]
    assert "NOT MET" in lines["ht-4k step, 8 virtual"]
    assert "met" in lines["ht-4k update"]
    assert "not measured" in lines["ht-std step, 8 virtual"]
    assert status == 1


def test_the_verdict_is_the_median_over_runs(tmp_path):
    runs = [[entry("ll-std", 8, step=phase(v))] for v in (76.0, 74.5, 74.8)]
    status, lines = run(tmp_path, *runs)
    assert "met" in lines["ll-std step, 8 virtual"] and "median 74.80" in lines["ll-std step, 8 virtual"]
    assert status == 0


def test_fp8_skew_and_one_rank_entries_feed_only_their_own_targets(tmp_path):
    status, lines = run(tmp_path, [
        entry("ll-std", 8, fp8="ue8m0", source="quantize", dispatch=phase(23.5), step=phase(70.0)),
        entry("ll-std", 1, dispatch=phase(8.0), step=phase(17.0)),
        entry("ht-std", 8, skew=1, combine=phase(250.0, percent=84.0)),
        entry("ht-std", 8, combine=phase(720.0, percent=96.0)),
    ])
    assert "met" in lines["FP8 ll-std dispatch (quantised), 8 virtual"] and "23.50" in lines["FP8 ll-std dispatch (quantised), 8 virtual"]
    assert "not measured" in lines["ll-std step, 8 virtual"]   # the FP8 entry is not the bf16 step
    assert "met" in lines["ll-std step, one rank"]
    assert "NOT MET" in lines["ht-std combine % of floor, skew 1"] and "84.00" in lines["ht-std combine % of floor, skew 1"]
    assert "met" in lines["ht-std combine % of floor"] and "96.00" in lines["ht-std combine % of floor"]
    assert status == 1


def test_the_fold_is_the_fused_call_less_the_dispatch(tmp_path):
    _, lines = run(tmp_path, [entry("ll-std", 8, dispatch=phase(38.5, 34.8), updateDispatch=phase(41.75, 39.0))])
    line = lines["ll-std update folded (upd+disp - dispatch)"]
    assert "NOT MET" in line and "median 3.25: 3.25 [4.20]" in line


def test_another_card_gets_no_verdict(tmp_path):
    status, lines = run(tmp_path, [entry("ll-std", 8, device="NVIDIA H100 80GB HBM3", step=phase(99.0)),
                                   entry("ll-1", 8, device="NVIDIA H100 80GB HBM3", dispatch=phase(5.5))])
    assert "above" in lines["ll-std step, 8 virtual"] and "NOT MET" not in lines["ll-std step, 8 virtual"]
    assert "below" in lines["ll-1 dispatch, 8 virtual"]
    assert any("no verdict" in line for line in lines.values())
    assert status == 0


def test_a_file_that_is_not_a_list_of_results_is_exit_status_2(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "ll-std"}))
    assert targets.main([str(path)]) == 2
    assert "not a list" in capsys.readouterr().err
    assert targets.main([str(tmp_path / "missing.json")]) == 2


def test_runs_with_other_options_than_the_standard_cases_are_not_read(tmp_path):
    status, lines = run(tmp_path, [
        entry("ll-std", 8, step=phase(70.0), options={"layout": "rank-major"}),
        entry("ll-std", 8, step=phase(71.0), options={"pipelineDepth": 2}),
        entry("ll-std", 8, step=phase(72.0), options={"sms": [66]}),
        entry("ll-std", 8, step=phase(73.0), options={"transport": "nccl"}),
        entry("ll-std", 8, step=phase(74.5), options={"dtype": "f16"}),
        entry("ll-std", 8, step=phase(76.0)),
    ])
    assert "NOT MET" in lines["ll-std step, 8 virtual"] and "median 76.00: 76.00" in lines["ll-std step, 8 virtual"]
    assert status == 1


def test_runs_not_validated_or_host_paced_give_no_verdict(tmp_path):
    """ep-bench marks a run whose results differ from the CPU oracle (validated: false) and one
    the host paced (hostPaced: true: the figures are the host's calls, not the GPU's): neither
    counts toward a verdict, and the line says how many were left out and why."""
    status, lines = run(tmp_path, [
        entry("ll-std", 8, step=phase(70.0), validated=False),
        entry("ll-std", 8, step=phase(74.0), hostPaced=True),
        entry("ht-4k", 8, step=phase(950.0), validated=True, hostPaced=False),
        entry("ht-4k", 8, step=phase(890.0), validated=False)])
    assert "not measured (2 run(s) left out: host-paced, not validated)" in lines["ll-std step, 8 virtual"]
    line = lines["ht-4k step, 8 virtual"]
    assert "NOT MET" in line and "median 950.00" in line and "(1 run(s) left out: not validated)" in line
    assert status == 1


def test_a_kernel_variants_runs_count_only_where_it_is_named(tmp_path):
    def with_variant(e, defines):
        e["run"]["kernelDefines"] = defines
        return e
    files = [[entry("ll-std", 8, step=phase(77.0))],
             [with_variant(entry("ll-std", 8, step=phase(74.0)), "EP_FP8_IN_FLIGHT=1,EP_LL_AHEAD=0")]]
    status, lines = run(tmp_path, *files)
    line = lines["ll-std step, 8 virtual"]
    assert "NOT MET" in line and "median 77.00: 77.00 (1 run(s) left out: another kernel variant)" in line
    assert status == 1
    # Its switches in another order name the same variant; the default's runs are then left out.
    status, lines = run(tmp_path, *files, defines="EP_LL_AHEAD=0,EP_FP8_IN_FLIGHT=1")
    line = lines["ll-std step, 8 virtual"]
    assert "met" in line and "median 74.00: 74.00 (1 run(s) left out: the default kernels)" in line
    assert lines["kernel variant: EP_FP8_IN_FLIGHT=1,EP_LL_AHEAD=0 (its runs only)"]
    assert status == 0
    assert "not measured" in run(tmp_path, *files, defines="EP_LL_AHEAD=1")[1]["ll-std step, 8 virtual"]


def test_defines_must_name_a_variant(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([entry("ll-std", 8, step=phase(74.0))]))
    assert targets.main(["--defines", " , ", str(path)]) == 2
    assert "targets: --defines takes NAME=value" in capsys.readouterr().err
    assert targets.main(["--defines=EP_LL_AHEAD=0", str(path)]) == 0   # (no run of it: nothing missed)
