"""Hazards of session 31's second probe, each now a named error, on the CPU backend:

- a CPU VirtualGroup (the C ABI's host backend) took any ``tuning=`` (``pipeline_depth=9``,
  ``row_pieces`` past the row's vectors) that a GPU group refuses by name, so code that ran on
  the CPU failed later on the GPU; the host backend now runs the GPU group's own check.
"""

import re

import numpy as np
import pytest

import expert_parallel as ep


def group(**overrides):
    settings = dict(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32")
    settings.update(overrides)
    return ep.VirtualGroup(**settings)


def nccl(**overrides):
    settings = dict(experts=4, hidden=8, top_k=2, max_tokens=3, rank=0, ranks=2, unique_id=bytes(128), device=0, dtype="f32")
    settings.update(overrides)
    return ep.NCCLGroup(**settings)


# hidden 8 of f32: 32 bytes, two 16-byte vectors a row.
BAD_TUNING = [
    ({"pipeline_depth": 9}, r"tuning\['pipeline_depth'\] = 9; must be in 1...8"),
    ({"rows_in_flight": 17}, r"tuning\['rows_in_flight'\] = 17; must be in 1...16"),
    ({"row_pieces": 3}, r"tuning\['row_pieces'\] = 3; must be in 1...2 \(16-byte vectors in a row\)"),
    ({"blocks_per_multiprocessor": 3}, r"tuning\['blocks_per_multiprocessor'\] = 3; must be 1 or 2"),
]


def _without_entry_point(message):
    # "epGroupCreate: invalid argument: ..." and "epGroupCreateNCCL: invalid argument: ...".
    return re.sub(r"^\w+: ", "", message)


@pytest.mark.parametrize("tuning,match", BAD_TUNING)
def test_a_cpu_group_refuses_the_tuning_a_gpu_group_refuses_in_its_words(tuning, match):
    with pytest.raises(ep.InvalidArgumentError, match="invalid argument: " + match) as cpu:
        group(tuning=tuning)
    # The same check as the GPU groups' (an NCCL rank checks its tuning before NCCL or a device
    # is opened, so a CPU machine reaches it): the same words.
    with pytest.raises(ep.InvalidArgumentError) as gpu:
        nccl(tuning=tuning)
    assert _without_entry_point(str(cpu.value)) == _without_entry_point(str(gpu.value))


def test_a_cpu_group_refuses_the_raw_c_tuning_too():
    # The C ABI's host backend with epGPUTuning_t fields out of bounds that the keywords refuse
    # before the library sees them (a negative knob, a switch past 2): the library's own check.
    import ctypes

    from expert_parallel import _abi, _config
    from expert_parallel._library import call

    config, _ = _config.group_config(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, algorithm="ll", layout=None,
                                     alignment=1, dtype="f32", max_recv_tokens=None, overflow="fail", timeout=10.0,
                                     fp8=None, fp8_source="quantize")
    for field, value, words in [("pipelineDepth", 9, "tuning['pipeline_depth'] = 9; must be in 1...8"),
                                ("rowPieces", -1, "tuning['row_pieces'] = -1; must be ≥ 0 (0 = the default)"),
                                ("launchGrid", 3, "tuning['full_grid'] = 3; must be 0 (default: fitted), 1 (fitted) or 2 (every SM's)")]:
        tuning = _abi.GPUTuning()
        setattr(tuning, field, value)
        backend = _abi.new(_abi.BackendConfig, backend=_abi.BACKEND_HOST, device=0, multiprocessors=0, tuning=tuning)
        handle = ctypes.c_void_p()
        with pytest.raises(ep.InvalidArgumentError) as caught:
            call("epGroupCreate", ctypes.byref(config), ctypes.byref(backend), ctypes.byref(handle))
        assert not handle.value
        assert str(caught.value) == "epGroupCreate: invalid argument: " + words


def test_a_cpu_group_takes_tuning_in_bounds_and_runs():
    with group(tuning={"pipeline_depth": 8, "rows_in_flight": 16, "row_pieces": 2, "blocks_per_multiprocessor": 1,
                       "update_chunk_tokens": 1, "fused_update": False, "full_grid": True, "serial_launches": True}) as g:
        xs = [np.full((1, 8), r + 1, np.float32) for r in range(2)]
        idx = [np.array([[0, 3]], np.int32)] * 2
        w = [np.array([[0.25, 0.5]], np.float32)] * 2
        out = g.dispatch(xs, idx, w)
        assert [float(c[0, 0]) for c in g.combine(out.tokens, out.handle)] == [0.75, 1.5]
