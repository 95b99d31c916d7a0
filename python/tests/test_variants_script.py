"""scripts/variants.py: a kernel variant's figures beside the default kernels', case by case,
and a variant whose results differ from the CPU oracle marked and failing the exit status."""
import json

from bench_results import report, script

variants = script("variants")


def result(name, ranks, defines=None, validated=True, fp8=None, source=None, skew=0, **phases):
    e = {"name": name, "ranks": ranks, "device": "NVIDIA H200", "tokens": 128, "dtype": "bf16", "fp8": fp8, "fp8Source": source,
         "layout": "expert-major", "validated": validated,
         "run": {"kernelDefines": defines, "options": {"skew": skew, "layout": None}}}
    e.update({k: {"median": v[0], "graphMicroseconds": v[1]} if isinstance(v, tuple) else {"median": v} for k, v in phases.items()})
    return e


def run(tmp_path, *files):
    return report(tmp_path, variants.report, files)


def rows(lines, *words):
    return [line.split() for line in lines if all(w in line.split() for w in words)]


def test_each_variant_is_the_median_of_its_runs_beside_the_default(tmp_path):
    status, lines = run(tmp_path,
                        [result("ht-4k", 8, dispatch=(470.0, 466.0), step=900.0)],
                        [result("ht-4k", 8, "EP_HT_BULK=1", dispatch=(460.0, 455.0), step=890.0)],
                        [result("ht-4k", 8, dispatch=(472.0, 468.0), step=902.0)],
                        [result("ht-4k", 8, "EP_HT_BULK=1", dispatch=(458.0, 453.0), step=888.0)])
    assert status == 0
    (default,) = rows(lines, "dispatch", "default")
    assert default[:5] == ["ht-4k", "8", "128", "bf16", "0"] and default[7:10] == ["471.00", "[467.00]", "2"]
    (bulk,) = rows(lines, "dispatch", "EP_HT_BULK=1")
    assert bulk[7:12] == ["459.00", "[454.00]", "2", f"{100 * (459 - 471) / 471:+.1f}", "%"]
    (step,) = rows(lines, "step", "EP_HT_BULK=1")
    assert step[7:] == ["889.00", "2", f"{100 * (889 - 901) / 901:+.1f}", "%"]


def test_cases_apart_and_switch_order_alike(tmp_path):
    _, lines = run(tmp_path, [
        result("ll-std", 8, dispatch=40.0), result("ll-std", 1, dispatch=8.0),
        result("ll-std", 8, fp8="ue8m0", source="quantize", dispatch=24.4),
        result("ll-std", 8, "EP_LL_AHEAD=0,EP_FP8_IN_FLIGHT=4", fp8="ue8m0", source="quantize", dispatch=23.9),
        result("ll-std", 8, "EP_FP8_IN_FLIGHT=4,EP_LL_AHEAD=0", fp8="ue8m0", source="quantize", dispatch=24.1),
        result("ht-std", 8, skew=1, combine=380.0), result("ht-std", 8, combine=700.0)])
    assert len(rows(lines, "dispatch", "default")) == 3
    (fp8,) = rows(lines, "fp8/ue8m0", "EP_FP8_IN_FLIGHT=4,EP_LL_AHEAD=0")
    assert fp8[7:9] == ["24.00", "2"] and fp8[9] == f"{100 * (24.0 - 24.4) / 24.4:+.1f}"
    assert [r[4] for r in rows(lines, "ht-std", "combine")] == ["0", "1"]


def test_a_variant_that_differs_from_the_oracle_is_marked_and_fails(tmp_path):
    status, lines = run(tmp_path, [result("ll-1", 8, dispatch=3.0),
                                   result("ll-1", 8, "EP_LL_AHEAD=0", validated=False, dispatch=2.0)])
    assert status == 1
    assert rows(lines, "EP_LL_AHEAD=0")[0][-1] == "MISMATCH" and "MISMATCH" not in rows(lines, "default")[0]


def test_a_file_that_is_not_ep_bench_results_is_exit_status_2(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "ll-std"}))
    assert variants.main([str(path)]) == 2 and "not a list of ep-bench results" in capsys.readouterr().err
    assert variants.main([str(tmp_path / "missing.json")]) == 2


def test_host_paced_runs_are_left_out_and_counted(tmp_path):
    paced = result("ll-1", 8, "EP_LL_AHEAD=0", dispatch=9.0)
    paced["hostPaced"] = True
    _, lines = run(tmp_path, [result("ll-1", 8, dispatch=3.0), paced, result("ll-1", 8, "EP_LL_AHEAD=0", dispatch=2.8)])
    (ahead,) = rows(lines, "EP_LL_AHEAD=0")
    assert ahead[7:9] == ["2.80", "1"] and lines[-1] == "left out: 1 host-paced run(s)"
