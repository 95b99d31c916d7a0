"""Lifetimes of the C ABI's opaque objects (epGroup_t, epHandle_t, epStep_t), through the raw
entry points on the CPU backend.

A destroyed object's pointer must stay refused (epInvalidArgument, "must be a live ...") for the
life of the process, as the header says of epStepDestroy ("later calls naming it fail with
epInvalidArgument") and as the registry promises of a stale pointer. The pointers were the
objects' addresses, which the allocator hands to the next object of that size: a group destroyed
and followed by another took the new group's identity, so a call through the stale pointer ran on
a group the caller never gave it (another shape, another owner's routing).
"""

import ctypes

import expert_parallel as ep
from expert_parallel import _abi
from expert_parallel._library import load


def _config(ranks=2):
    return _abi.new(_abi.GroupConfig, algorithm=0, layout=0, ranks=ranks, experts=2 * ranks, topK=2, hidden=8,
                    elementType=_abi.F32, maxTokensPerRank=4)


def _group(lib, ranks=2):
    group = ctypes.c_void_p()
    assert lib.epGroupCreate(ctypes.byref(_config(ranks)), None, ctypes.byref(group)) == _abi.SUCCESS
    return group


def _refused(status, lib, kind):
    message = lib.epGetLastErrorMessage().decode()
    return status == _abi.INVALID_ARGUMENT and f"must be a live {kind}" in message


def test_a_destroyed_group_stays_refused_when_another_group_is_made():
    lib = load()
    live = []
    try:
        for _ in range(16):
            stale = _group(lib)
            assert lib.epGroupDestroy(stale) == _abi.SUCCESS
            live.append(_group(lib, ranks=4))   # the same size of object: the allocator's next one
            info = _abi.new(_abi.GroupInfo)
            status = lib.epGroupGetInfo(stale, ctypes.byref(info))
            assert _refused(status, lib, "epGroup_t"), (status, info.ranks)
            assert lib.epGroupDestroy(stale) == _abi.INVALID_ARGUMENT
    finally:
        for group in live:
            lib.epGroupDestroy(group)


def test_a_destroyed_handle_or_step_stays_refused_when_others_are_made():
    lib = load()
    group = _group(lib)
    live_handles, live_steps = [], []
    try:
        for _ in range(16):
            handle, step = ctypes.c_void_p(), ctypes.c_void_p()
            assert lib.epHandleCreate(group, 0, ctypes.byref(handle)) == _abi.SUCCESS
            assert lib.epStepCreate(group, ctypes.byref(step)) == _abi.SUCCESS
            assert lib.epHandleDestroy(handle) == _abi.SUCCESS
            assert lib.epStepDestroy(step) == _abi.SUCCESS
            for _ in range(4):
                made_handle, made_step = ctypes.c_void_p(), ctypes.c_void_p()
                assert lib.epHandleCreate(group, 1, ctypes.byref(made_handle)) == _abi.SUCCESS
                assert lib.epStepCreate(group, ctypes.byref(made_step)) == _abi.SUCCESS
                live_handles.append(made_handle)
                live_steps.append(made_step)
            assert _refused(lib.epHandleDestroy(handle), lib, "epHandle_t")
            info = _abi.new(_abi.LayoutInfo)
            assert _refused(lib.epStepGetLayoutInfo(step, 0, ctypes.byref(info)), lib, "epStep_t")
    finally:
        for handle in live_handles:
            lib.epHandleDestroy(handle)
        for step in live_steps:
            lib.epStepDestroy(step)
        lib.epGroupDestroy(group)


def test_an_object_of_one_kind_is_refused_as_another():
    lib = load()
    group = _group(lib)
    handle, step = ctypes.c_void_p(), ctypes.c_void_p()
    assert lib.epHandleCreate(group, 0, ctypes.byref(handle)) == _abi.SUCCESS
    assert lib.epStepCreate(group, ctypes.byref(step)) == _abi.SUCCESS
    try:
        info = _abi.new(_abi.GroupInfo)
        assert _refused(lib.epGroupGetInfo(handle, ctypes.byref(info)), lib, "epGroup_t")
        assert _refused(lib.epGroupGetInfo(step, ctypes.byref(info)), lib, "epGroup_t")
        assert _refused(lib.epComplete(group, None), lib, "epHandle_t")
        assert _refused(lib.epStepGetLayoutInfo(handle, 0, ctypes.byref(_abi.new(_abi.LayoutInfo))), lib, "epStep_t")
    finally:
        lib.epHandleDestroy(handle)
        lib.epStepDestroy(step)
        lib.epGroupDestroy(group)


def test_a_destroy_calls_success_leaves_another_calls_error_message():
    """A garbage collector's finalizer (a group or handle collected in a cycle) runs epGroupDestroy
    or epHandleDestroy at any moment, also between another call's failure and the caller's read of
    its message: the destroy's success cleared it, and the package raised the status's generic
    text ("epInvalidArgument: a pointer, struct size, ...") instead of the field, value and bound."""
    lib = load()
    group, doomed = _group(lib), _group(lib)
    handle, step = ctypes.c_void_p(), ctypes.c_void_p()
    assert lib.epHandleCreate(group, 0, ctypes.byref(handle)) == _abi.SUCCESS
    assert lib.epStepCreate(group, ctypes.byref(step)) == _abi.SUCCESS
    try:
        assert lib.epGroupGetInfo(group, None) == _abi.INVALID_ARGUMENT
        message = lib.epGetLastErrorMessage().decode()
        assert message.startswith("epGroupGetInfo: ") and "info" in message, message
        assert lib.epHandleDestroy(handle) == _abi.SUCCESS
        assert lib.epStepDestroy(step) == _abi.SUCCESS
        assert lib.epGroupDestroy(doomed) == _abi.SUCCESS
        assert lib.epGetLastErrorMessage().decode() == message
        assert lib.epGroupGetInfo(group, ctypes.byref(_abi.new(_abi.GroupInfo))) == _abi.SUCCESS   # any other call clears it
        assert lib.epGetLastErrorMessage().decode() == ""
    finally:
        lib.epGroupDestroy(group)
