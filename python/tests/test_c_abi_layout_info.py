"""epGroupGetLayoutInfo answers for the group's own step (the calls whose config names no step);
a named step's layout is epStepGetLayoutInfo's. After a dispatch of a named step only, the CPU
group said "no collective dispatch has completed yet", which a collective dispatch just had."""

import ctypes

import numpy as np

from expert_parallel import _abi
from expert_parallel._library import load
from c_abi_tensors import host_tensor as _tensor

R, E, K, H = 2, 4, 2, 8


def test_the_groups_layout_info_after_a_named_steps_dispatch_points_to_the_steps():
    lib = load()
    config = _abi.new(_abi.GroupConfig, algorithm=0, layout=1, ranks=R, experts=E, topK=K, hidden=H, elementType=_abi.F32,
                      maxTokensPerRank=2)
    group, step = ctypes.c_void_p(), ctypes.c_void_p()
    assert lib.epGroupCreate(ctypes.byref(config), None, ctypes.byref(group)) == _abi.SUCCESS
    assert lib.epStepCreate(group, ctypes.byref(step)) == _abi.SUCCESS
    try:
        idx = [np.array([[0, 3]], np.int32) for _ in range(R)]
        x = [np.ones((1, H), np.float32) for _ in range(R)]
        received = [np.zeros((E // R, R * 2, H), np.float32) for _ in range(R)]
        tensors = [_tensor(a, _abi.I32) for a in idx] + [_tensor(a, _abi.F32) for a in x + received]
        updates = (_abi.UpdateInputs * R)(*[_abi.new(_abi.UpdateInputs, topkIdx=ctypes.pointer(tensors[r])) for r in range(R)])
        inputs = (_abi.DispatchInputs * R)(*[_abi.new(_abi.DispatchInputs, tokens=ctypes.pointer(tensors[R + r])) for r in range(R)])
        outputs = (_abi.DispatchOutputs * R)(*[_abi.new(_abi.DispatchOutputs, tokens=ctypes.pointer(tensors[2 * R + r]))
                                               for r in range(R)])
        assert lib.epGroupUpdateAll(group, updates, ctypes.byref(_abi.new(_abi.UpdateConfig, step=step)), None) == _abi.SUCCESS
        assert lib.epGroupDispatchAll(group, inputs, outputs, ctypes.byref(_abi.new(_abi.DispatchConfig, step=step)),
                                      None) == _abi.SUCCESS
        info = _abi.new(_abi.LayoutInfo)
        assert lib.epStepGetLayoutInfo(step, 0, ctypes.byref(info)) == _abi.SUCCESS and info.receivedTotal == 2
        assert lib.epGroupGetLayoutInfo(group, 0, ctypes.byref(info)) == _abi.INVALID_USAGE
        message = lib.epGetLastErrorMessage().decode()
        assert message == ("epGroupGetLayoutInfo: call out of order: rank 0 has no layout info: no dispatch of the group's own "
                           "step (a config.step of NULL) has completed yet; a named step's is epStepGetLayoutInfo's"), message
    finally:
        lib.epStepDestroy(step)
        lib.epGroupDestroy(group)
