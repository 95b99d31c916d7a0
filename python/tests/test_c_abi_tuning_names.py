"""A tuning knob out of its bounds is named as the C struct carries it: `backend.tuning.rowPieces`
in epGroupCreate's epBackendConfig_t, `ncclRank.tuning.rowPieces` in epGroupCreateNCCL's
epNCCLRankConfig_t. A negative knob already was (`backend.tuning.rowPieces = -1; must be ≥ 0`);
one past its upper bound, or past what the group's shape allows, was named `tuning.rowPieces`,
a field of neither struct. Both are refused before a device or NCCL is opened, so a CPU machine
reaches them."""

import ctypes

import pytest

from expert_parallel import _abi
from expert_parallel._library import load


def _config():
    return _abi.new(_abi.GroupConfig, algorithm=0, layout=0, ranks=2, experts=4, topK=2, hidden=64,
                    elementType=_abi.F32, maxTokensPerRank=4)


KNOBS = [("pipelineDepth", 9, "must be in 1...8"), ("rowsInFlight", 17, "must be in 1...16"),
         ("rowPieces", 17, "must be in 1...16 (16-byte vectors in a row)"),
         ("blocksPerMultiprocessor", 3, "must be 1 or 2")]


@pytest.mark.parametrize("knob,value,requirement", KNOBS)
@pytest.mark.parametrize("backend", [_abi.BACKEND_HOST, _abi.BACKEND_VIRTUAL_GPU])
def test_a_group_backends_knob_out_of_bounds_names_backend_tuning(knob, value, requirement, backend):
    lib = load()
    choice = _abi.new(_abi.BackendConfig, backend=backend)
    setattr(choice.tuning, knob, value)
    group = ctypes.c_void_p()
    assert lib.epGroupCreate(ctypes.byref(_config()), ctypes.byref(choice), ctypes.byref(group)) == _abi.INVALID_ARGUMENT
    message = lib.epGetLastErrorMessage().decode()
    assert message.startswith(f"epGroupCreate: invalid argument: backend.tuning.{knob} = {value}; {requirement}"), message


@pytest.mark.parametrize("knob,value,requirement", KNOBS)
def test_an_nccl_ranks_knob_out_of_bounds_names_nccl_rank_tuning(knob, value, requirement):
    lib = load()
    rank = _abi.new(_abi.NCCLRankConfig, rank=0, device=0)
    setattr(rank.tuning, knob, value)
    group = ctypes.c_void_p()
    assert lib.epGroupCreateNCCL(ctypes.byref(_config()), ctypes.byref(rank), ctypes.byref(group)) == _abi.INVALID_ARGUMENT
    message = lib.epGetLastErrorMessage().decode()
    assert message.startswith(f"epGroupCreateNCCL: invalid argument: ncclRank.tuning.{knob} = {value}; {requirement}"), message
