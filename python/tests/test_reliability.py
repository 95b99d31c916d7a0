"""Issue 14, items 1 and 3, through the C ABI on the host backend (raw entry points, ctypes).

1. Sizes a caller controls are checked before anything is read or allocated for them: a topkIdx
   with more rows than maxTokensPerRank (even over a short buffer), a config whose host routing
   metadata cannot fit (huge `experts`), a huge `hidden` with 0 tokens. Each gets a named error;
   none may abort the process, so each runs in a subprocess whose address space is limited (an
   attempt to allocate GiB of scratch then fails there, as it would on a smaller machine).
3. Order and messages: combine without a dispatch is epInvalidUsage (wrongOrder); a timeout is
   echoed as given; a timeout inside a call reports the timeout and the peers; a rank deactivated
   mid-step makes the others' next call fail at once (epInvalidUsage), not after the timeout.
"""

import ctypes
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import expert_parallel as ep
from expert_parallel import _abi
from expert_parallel._library import call
from conftest import ROOT

DTYPES = {np.float32: _abi.F32, np.int32: _abi.I32, np.int64: _abi.I64}


def describe(array, shape=None):
    """The epTensor_t of a C-contiguous NumPy array; `shape` claims another shape over its data."""
    shape = tuple(array.shape if shape is None else shape)
    t = _abi.new(_abi.Tensor, data=array.ctypes.data, dtype=DTYPES[array.dtype.type], ndim=len(shape), device=-1)
    stride = 1
    for i in reversed(range(len(shape))):
        t.sizes[i] = shape[i]
        t.strides[i] = stride
        stride *= shape[i]
    return t


def make_group(*, ranks=2, experts=4, top_k=2, hidden=8, max_tokens=1, algorithm="ll", layout="expert_major",
               max_recv=0, timeout=5.0):
    config = _abi.new(_abi.GroupConfig, algorithm=_abi.ALGORITHMS[algorithm], layout=_abi.LAYOUTS[layout],
                      alignment=0, ranks=ranks, experts=experts, topK=top_k, hidden=hidden, elementType=_abi.F32,
                      maxTokensPerRank=max_tokens, maxReceivedTokensPerRank=max_recv, overflow=0,
                      timeoutSeconds=timeout)
    handle = ctypes.c_void_p()
    call("epGroupCreate", ctypes.byref(config), None, ctypes.byref(handle))
    return handle


def isolated(body, limit_gib=3):
    """Runs `body` (Python source using this module's helpers) in a fresh interpreter whose
    address space is limited to `limit_gib` GiB; returns its exit code and output."""
    prelude = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({limit_gib} << 30, {limit_gib} << 30))
        sys.path[:0] = [{str(ROOT / 'python')!r}, {str(ROOT / 'python' / 'tests')!r}]
        from test_reliability import *
        from expert_parallel import _abi
    """)
    run = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, EP_LIBRARY=str(ep.library_path())))
    return run.returncode, run.stdout + run.stderr


def expect_isolated(body, *expected):
    code, output = isolated(body)
    assert code == 0, f"exit {code}:\n{output}"
    for text in expected:
        assert text in output, output


def per_rank(handles, body):
    """Runs body(rank, handle) for each rank on a thread of its own; returns each rank's exception
    (None on success) and the seconds it all took."""
    errors = [None] * len(handles)

    def run(r):
        try:
            body(r, handles[r])
        except ep.ExpertParallelError as error:
            errors[r] = error

    start = time.monotonic()
    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors, time.monotonic() - start


# MARK: 1. validate before allocating or reading

def test_too_many_rows_over_a_short_buffer_are_refused_by_row_count_before_reading():
    expect_isolated("""
        group = make_group()
        idx = np.array([[0, 3], [999, 999]], np.int32)   # one valid row, then a row past the caller's routing
        inputs = (_abi.UpdateInputs * 2)()
        keep = []
        for r, shape in enumerate([(2, 2), (1 << 40, 2)]):   # rank 0: 2 rows > maxTokensPerRank 1; rank 1: 2^40
            t = describe(idx, shape); keep.append(t)
            inputs[r] = _abi.new(_abi.UpdateInputs, topkIdx=ctypes.pointer(t))
        try:
            call("epGroupUpdateAll", group, inputs, None, None)
        except ep.InvalidArgumentError as error:
            print("collective:", error)
        t = describe(idx, (1 << 40, 2))
        handle = ctypes.c_void_p()
        call("epHandleCreate", group, 1, ctypes.byref(handle))
        one = _abi.new(_abi.UpdateInputs, topkIdx=ctypes.pointer(t))
        try:
            call("epHandleUpdate", handle, ctypes.byref(one), None, None)
        except ep.InvalidArgumentError as error:
            print("per-rank:", error)
    """, "collective: epGroupUpdateAll: rank 0: invalid argument: inputs[0].topkIdx.sizes[0] (tokens) = 2; "
         "must be in 0...max_tokens (1)",
         "per-rank: epHandleUpdate: invalid argument: inputs.topkIdx.sizes[0] (tokens) = 1099511627776; "
         "must be in 0...max_tokens (1)")


def test_a_config_whose_host_metadata_cannot_fit_is_refused_at_creation_by_name():
    # 64 ranks × ~2^31 experts: terabytes of per-step routing metadata on the host backend.
    expect_isolated("""
        try:
            make_group(ranks=64, experts=(1 << 31) - 64, top_k=1, hidden=2, algorithm="ht", layout="flat", max_recv=1)
            print("created")
        except ep.InvalidArgumentError as error:
            assert isinstance(error, ep.OutOfMemoryError) and isinstance(error, MemoryError), type(error)
            assert error.status == _abi.INVALID_ARGUMENT and error.status_name == "epInvalidArgument"
            print(error)
    """, "epGroupCreate: out of memory: the host backend's routing metadata of one step (64 ranks",
         "experts 2147483584", "TiB)")


def test_a_step_with_more_tokens_than_the_host_can_plan_is_refused_by_name_before_allocating():
    # Fits at creation (maxTokensPerRank is only a bound); a routing of 2^30 tokens × top-32 does not.
    expect_isolated("""
        group = make_group(ranks=2, experts=64, top_k=32, hidden=2, max_tokens=(1 << 31) - 1, algorithm="ht",
                           layout="flat", max_recv=1)
        idx = np.zeros((1, 32), np.int32)
        t = describe(idx, (1 << 30, 32))
        handle = ctypes.c_void_p()
        call("epHandleCreate", group, 0, ctypes.byref(handle))
        try:
            call("epHandleUpdate", handle, ctypes.byref(_abi.new(_abi.UpdateInputs, topkIdx=ctypes.pointer(t))), None, None)
        except ep.InvalidArgumentError as error:
            print(error)
    """, "epHandleUpdate: out of memory: the host backend's routing metadata of one step with 1073741824 tokens per rank")


def test_combine_with_a_huge_hidden_and_no_tokens_allocates_no_row_scratch():
    # hidden = 2^31 - 2 float32: a row is 8 GiB, more than the subprocess may map.
    expect_isolated("""
        H = (1 << 31) - 2
        group = make_group(hidden=H)
        idx = np.zeros((0, 2), np.int32); x = np.zeros((1,), np.float32); w = np.zeros((0, 2), np.float32)
        keep = []
        def ref(array, shape):
            t = describe(array, shape); keep.append(t); return ctypes.pointer(t)
        update, din, dout = (_abi.UpdateInputs * 2)(), (_abi.DispatchInputs * 2)(), (_abi.DispatchOutputs * 2)()
        cin, cout = (_abi.CombineInputs * 2)(), (_abi.CombineOutputs * 2)()
        for r in range(2):
            update[r] = _abi.new(_abi.UpdateInputs, topkIdx=ref(idx, (0, 2)))
            din[r] = _abi.new(_abi.DispatchInputs, tokens=ref(x, (0, H)))
            dout[r] = _abi.new(_abi.DispatchOutputs, tokens=ref(x, (2, 2, H)))
            # (The ranks' claimed receive buffers may not share bytes: rank 1's starts after rank 0's. No row reaches either.)
            dout[r].tokens.contents.data += r * 4 * 2 * 2 * H
            cin[r] = _abi.new(_abi.CombineInputs, expertOutputs=ref(x, (2, 2, H)), topkWeights=ref(w, (0, 2)))
            cout[r] = _abi.new(_abi.CombineOutputs, tokens=ref(x, (0, H)))
        call("epGroupUpdateAll", group, update, None, None)
        call("epGroupDispatchAll", group, din, dout, None, None)
        call("epGroupCombineAll", group, cin, cout, None, None)
        print("combined")
    """, "combined")


# MARK: 3. order and messages

class Step:
    """Every rank's tensors of one LL expert-major step: one token per rank, to experts 0 and 3."""

    def __init__(self, ranks=2, experts=4):
        L, K, H = experts // ranks, 2, 8
        self.ranks = ranks
        self.idx = [np.array([[0, experts - 1]], np.int32) for _ in range(ranks)]
        self.x = [np.full((1, H), r + 1, np.float32) for r in range(ranks)]
        self.w = [np.full((1, K), 0.5, np.float32) for _ in range(ranks)]
        self.received = [np.zeros((L, ranks, H), np.float32) for _ in range(ranks)]
        self.y = [np.full((1, H), -7, np.float32) for _ in range(ranks)]
        self.keep = []

    def ref(self, array):
        t = describe(array)
        self.keep.append(t)
        return ctypes.pointer(t)

    def update_inputs(self, r):
        return _abi.new(_abi.UpdateInputs, topkIdx=self.ref(self.idx[r]))

    def dispatch_args(self, r):
        return (_abi.new(_abi.DispatchInputs, tokens=self.ref(self.x[r])),
                _abi.new(_abi.DispatchOutputs, tokens=self.ref(self.received[r])))

    def combine_args(self, r):
        return (_abi.new(_abi.CombineInputs, expertOutputs=self.ref(self.received[r]), topkWeights=self.ref(self.w[r])),
                _abi.new(_abi.CombineOutputs, tokens=self.ref(self.y[r])))

    def all(self, maker):
        pairs = [maker(r) for r in range(self.ranks)]
        if isinstance(pairs[0], tuple):
            first, second = type(pairs[0][0]) * self.ranks, type(pairs[0][1]) * self.ranks
            return first(*[p[0] for p in pairs]), second(*[p[1] for p in pairs])
        return (type(pairs[0]) * self.ranks)(*pairs)

    # per-rank calls
    def update(self, r, handle):
        call("epHandleUpdate", handle, ctypes.byref(self.update_inputs(r)), None, None)

    def dispatch(self, r, handle):
        din, dout = self.dispatch_args(r)
        call("epDispatch", handle, ctypes.byref(din), ctypes.byref(dout), None, None)

    def combine(self, r, handle):
        cin, cout = self.combine_args(r)
        call("epCombine", handle, ctypes.byref(cin), ctypes.byref(cout), None, None)


def handles_of(group, ranks):
    handles = []
    for r in range(ranks):
        h = ctypes.c_void_p()
        call("epHandleCreate", group, r, ctypes.byref(h))
        handles.append(h)
    return handles


def test_collective_combine_without_a_dispatch_is_wrong_order_and_writes_nothing():
    group = make_group()
    step = Step()
    call("epGroupUpdateAll", group, step.all(step.update_inputs), None, None)
    cin, cout = step.all(step.combine_args)
    with pytest.raises(ep.InvalidUsageError, match=r"^epGroupCombineAll: call out of order: combine needs a dispatch"):
        call("epGroupCombineAll", group, cin, cout, None, None)
    assert all(np.all(y == -7) for y in step.y)
    din, dout = step.all(step.dispatch_args)
    call("epGroupDispatchAll", group, din, dout, None, None)
    call("epGroupCombineAll", group, cin, cout, None, None)
    assert np.all(step.y[1] == 0.5 * 2 * 2)
    call("epGroupDestroy", group)


def test_per_rank_combine_without_a_dispatch_is_wrong_order():
    group = make_group()
    step = Step()
    handles = handles_of(group, 2)
    errors, _ = per_rank(handles, step.update)
    assert errors == [None, None]
    errors, _ = per_rank(handles, step.combine)
    for error in errors:
        assert isinstance(error, ep.InvalidUsageError) and "combine needs a dispatch" in str(error), error
    assert all(np.all(y == -7) for y in step.y)


@pytest.mark.parametrize("given", [1e-12, 5e-10, 86401.0, float("inf")])
def test_a_timeout_out_of_bounds_is_echoed_as_given(given):
    with pytest.raises(ep.InvalidArgumentError) as caught:
        make_group(timeout=given)
    # (the package's errors name the group's settings by its keywords: timeout, not timeoutSeconds)
    assert f"timeout = {given!r}; must be in [1e-9, 86400] seconds" in str(caught.value), str(caught.value)
    assert "0.0 seconds" not in str(caught.value)


@pytest.mark.parametrize("given", [0.3, 0.03, 1.001, 1.14])
def test_a_timeout_in_a_call_names_the_timeout_as_configured(given):
    # The seconds went to whole nanoseconds by truncation (1.001 s: 1000999999 ns) and back by
    # multiplying the attoseconds by 1e-18: 0.3 came back as 0.30000000000000004 s.
    group = make_group(timeout=given)
    handles = handles_of(group, 2)
    errors, _ = per_rank(handles[:1], Step().update)   # rank 1 does not come
    assert isinstance(errors[0], ep.RankTimeoutError), errors[0]
    assert str(errors[0]).endswith(f"; the group's timeout is {given!r} seconds"), str(errors[0])


def test_a_timeout_in_a_call_reports_the_timeout_and_the_peers_also_to_the_late_rank():
    group = make_group(timeout=0.2)
    step = Step()
    handles = handles_of(group, 2)
    errors, _ = per_rank(handles[:1], step.update)   # rank 1 does not come
    assert isinstance(errors[0], ep.RankTimeoutError), errors[0]
    assert str(errors[0]) == ("epHandleUpdate: rank 0: timeout: rank 0 waited past the timeout for rank(s) [1], now "
                              "masked inactive; the group's timeout is 0.2 seconds"), str(errors[0])
    with pytest.raises(ep.RankTimeoutError) as caught:   # rank 1 comes late for the same call
        step.update(1, handles[1])
    assert str(caught.value) == ("epHandleUpdate: rank 1: timeout: rank 0 waited past the timeout for rank(s) [1], "
                                 "now masked inactive; the group's timeout is 0.2 seconds"), str(caught.value)
    with pytest.raises(ep.InactiveRankError):   # a later call: it is masked until cleaned
        step.update(1, handles[1])
    call("epGroupCleanRanks", group, 3)
    errors, _ = per_rank(handles, step.update)
    assert errors == [None, None]


@pytest.mark.parametrize("when", ["between update and dispatch", "between dispatch and combine"])
def test_a_rank_deactivated_mid_step_fails_the_next_call_at_once(when):
    group = make_group(ranks=3, experts=6, timeout=3.0)
    step = Step(ranks=3, experts=6)
    handles = handles_of(group, 3)
    errors, _ = per_rank(handles, step.update)
    assert errors == [None] * 3
    if when == "between dispatch and combine":
        errors, _ = per_rank(handles, step.dispatch)
        assert errors == [None] * 3
    call("epGroupDeactivateRank", group, 1)
    following = step.dispatch if when == "between update and dispatch" else step.combine
    errors, elapsed = per_rank(handles, following)
    assert elapsed < 1.5, f"took {elapsed:.1f} s (the timeout is 3 s)"
    for r in (0, 2):
        assert isinstance(errors[r], ep.InvalidUsageError), errors[r]
        assert "the active ranks went from [0, 1, 2] to [0, 2] since this handle's update" in str(errors[r])
    assert isinstance(errors[1], ep.InactiveRankError), errors[1]
    # Updated again without rank 1, the step runs.
    live = [handles[0], handles[2]]
    for call_ in (step.update, step.dispatch, step.combine):
        errors, _ = per_rank(live, lambda i, h: call_((0, 2)[i], h))
        assert errors == [None, None]
