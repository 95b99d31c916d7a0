"""A stacked dispatch without topkIdx (a dispatch of the step's routing again, the backward pass)
takes one B for every rank, `call.tokens`. Where the step's ranks were updated with different
token counts (epGroupUpdateAll takes a [B_r, K] routing per rank), no stacked call can describe
it: the virtual GPU group refuses it by naming topkIdx ("must be given: the step's ranks have
different token counts"). The CPU group went on to rank 0's per-rank checks and answered in the
core's names, `rank 0: invalid argument: input.tokens.shape = [3, 8]; must be [1, 8]`: no field
of epStackedDispatch_t is called `input.tokens`.
"""

import ctypes

import numpy as np
import pytest

from expert_parallel import _abi
from expert_parallel._library import load
from c_abi_tensors import host_tensor as _tensor

R, E, K, H = 2, 4, 2, 8


def _stacked(array, dtype):
    return _abi.Stacked(data=array.ctypes.data, dtype=dtype, device=-1, rankStride=0)


@pytest.fixture
def lib():
    return load()


def _group(lib, layout):
    algorithm = 1 if layout in (3, 4) else 0
    config = _abi.new(_abi.GroupConfig, algorithm=algorithm, layout=layout, ranks=R, experts=E, topK=K, hidden=H,
                      elementType=_abi.F32, maxTokensPerRank=3)
    group = ctypes.c_void_p()
    assert lib.epGroupCreate(ctypes.byref(config), None, ctypes.byref(group)) == _abi.SUCCESS
    info = _abi.new(_abi.GroupInfo)
    assert lib.epGroupGetInfo(group, ctypes.byref(info)) == _abi.SUCCESS
    return group, info


def _update(lib, group, tokens, step=None):
    idx = [np.array([[r, E - 1 - r]] * b, np.int32) for r, b in enumerate(tokens)]
    tensors = [_tensor(i, _abi.I32) for i in idx]
    inputs = (_abi.UpdateInputs * R)(*[_abi.new(_abi.UpdateInputs, topkIdx=ctypes.pointer(t)) for t in tensors])
    config = _abi.new(_abi.UpdateConfig, step=step)
    assert lib.epGroupUpdateAll(group, inputs, ctypes.byref(config), None) == _abi.SUCCESS, lib.epGetLastErrorMessage()


def _backward(lib, group, info, tokens, step=None):
    shape = tuple(info.receiveShape[:info.receiveNdim])
    routing = tuple(info.receiveRoutingShape[:info.receiveRoutingNdim])
    keep = [np.ones((R, tokens, H), np.float32), np.ones((R, tokens, K), np.float32), np.full((R,) + shape, -5, np.float32)]
    call = _abi.new(_abi.StackedDispatch, tokens=tokens, inputTokens=_stacked(keep[0], _abi.F32),
                    topkWeights=_stacked(keep[1], _abi.F32), receivedTokens=_stacked(keep[2], _abi.F32),
                    direction=1, step=step)
    if routing:
        keep += [np.zeros((R,) + routing, np.int32), np.zeros((R,) + routing, np.float32)]
        call.receivedTopkIdx = _stacked(keep[3], _abi.I32)
        call.receivedTopkWeights = _stacked(keep[4], _abi.F32)
    status = lib.epGroupDispatchStacked(group, ctypes.byref(call), None)
    return status, lib.epGetLastErrorMessage().decode(), keep[2]


@pytest.mark.parametrize("layout", [1, 2, 3, 4])
@pytest.mark.parametrize("own_step", [True, False])
@pytest.mark.parametrize("tokens", [1, 3])
def test_a_stacked_dispatch_again_of_a_step_whose_ranks_differ_in_tokens_names_topk_idx(lib, layout, own_step, tokens):
    group, info = _group(lib, layout)
    step = None
    if not own_step:
        step = ctypes.c_void_p()
        assert lib.epStepCreate(group, ctypes.byref(step)) == _abi.SUCCESS
    try:
        _update(lib, group, [1, 3], step)
        status, message, received = _backward(lib, group, info, tokens, step)
        assert status == _abi.INVALID_ARGUMENT
        assert message == ("epGroupDispatchStacked: invalid argument: call.topkIdx = NULL; must be given: the step's ranks "
                           "have different token counts (1, 3), which a stacked call cannot send again"), message
        assert np.all(received == -5)
        # The same step with one B for every rank is sent again.
        _update(lib, group, [2, 2], step)
        status, message, received = _backward(lib, group, info, 2, step)
        assert status == _abi.SUCCESS, message
    finally:
        if step is not None:
            lib.epStepDestroy(step)
        lib.epGroupDestroy(group)


def test_a_masked_rank_does_not_count_among_the_ranks_tokens(lib):
    group, info = _group(lib, 1)
    try:
        assert lib.epGroupDeactivateRank(group, 1) == _abi.SUCCESS
        _update(lib, group, [2, 3])   # rank 1's routing is not read
        status, message, _ = _backward(lib, group, info, 2)
        assert status == _abi.SUCCESS, message
        status, message, _ = _backward(lib, group, info, 3)
        assert status == _abi.INVALID_ARGUMENT
        assert message == ("epGroupDispatchStacked: invalid argument: call.tokens = 3; must be the step's (2) when no topkIdx "
                           "is given"), message
    finally:
        lib.epGroupDestroy(group)
