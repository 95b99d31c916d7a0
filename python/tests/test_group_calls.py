"""The C layer's collective calls on the host backend, through the raw entry points: a failed call
names the rank whose own check failed ("rank r: ..."), the lowest when several did; masked ranks'
arguments are not read and their layout info is not written; a dispatch after the active ranks
changed is the group's refusal, naming no rank."""

import ctypes

import numpy as np
import pytest

import expert_parallel as ep
from expert_parallel import _abi, _arrays
from expert_parallel._library import call
from expert_parallel.group import _LayoutBuffers

R, E, K, H, B = 2, 4, 2, 8, 1
L = E // R
DTYPES = {np.float32: _abi.F32, np.int32: _abi.I32, np.int64: _abi.I64}


def describe(array):
    """The epTensor_t of any C-contiguous NumPy array, whatever its shape."""
    return _arrays.tensor(array, "array", dtypes={DTYPES[array.dtype.type]}, device=-1, shape=array.shape)


@pytest.fixture
def group():
    config = _abi.new(_abi.GroupConfig, algorithm=_abi.ALGORITHMS["ll"], layout=_abi.LAYOUTS["expert_major"],
                      alignment=0, ranks=R, experts=E, topK=K, hidden=H, elementType=_abi.F32,
                      maxTokensPerRank=B, maxReceivedTokensPerRank=0, overflow=0, timeoutSeconds=5.0)
    handle = ctypes.c_void_p()
    call("epGroupCreate", ctypes.byref(config), None, ctypes.byref(handle))
    yield handle
    call("epGroupDestroy", handle)


class Step:
    """Every rank's tensors of one step: one token of value r + 1, routed to experts 0 and 3 (one on
    each rank); the C structs that point at them, rebuilt by `structs()` after a test swaps one."""

    def __init__(self):
        self.idx = [np.array([[0, 3]], np.int32) for _ in range(R)]
        self.x = [np.full((B, H), r + 1, np.float32) for r in range(R)]
        self.w = [np.full((B, K), 0.5, np.float32) for _ in range(R)]
        self.received = [np.zeros((L, R * B, H), np.float32) for _ in range(R)]
        self.y = [np.zeros((B, H), np.float32) for _ in range(R)]
        self.layout = [_LayoutBuffers(L, R) for _ in range(R)]
        self.skip = set()  # ranks whose tensors are NULL

    def structs(self):
        self.keep = []

        def ref(array, r):
            if r in self.skip:
                return None
            descriptor = describe(array)
            self.keep.append(descriptor)
            return ctypes.pointer(descriptor)

        update, din, dout = (_abi.UpdateInputs * R)(), (_abi.DispatchInputs * R)(), (_abi.DispatchOutputs * R)()
        cin, cout = (_abi.CombineInputs * R)(), (_abi.CombineOutputs * R)()
        for r in range(R):
            update[r] = _abi.new(_abi.UpdateInputs, topkIdx=ref(self.idx[r], r))
            din[r] = _abi.new(_abi.DispatchInputs, tokens=ref(self.x[r], r))
            dout[r] = _abi.new(_abi.DispatchOutputs, tokens=ref(self.received[r], r),
                               layoutInfo=ctypes.pointer(self.layout[r].struct))
            cin[r] = _abi.new(_abi.CombineInputs, expertOutputs=ref(self.received[r], r), topkWeights=ref(self.w[r], r))
            cout[r] = _abi.new(_abi.CombineOutputs, tokens=ref(self.y[r], r))
        return update, din, dout, cin, cout

    def update(self, group):
        call("epGroupUpdateAll", group, self.structs()[0], None, None)

    def dispatch(self, group):
        _, din, dout, _, _ = self.structs()
        call("epGroupDispatchAll", group, din, dout, None, None)

    def combine(self, group):
        _, _, _, cin, cout = self.structs()
        call("epGroupCombineAll", group, cin, cout, None, None)


def message(error_type, body):
    with pytest.raises(error_type) as caught:
        body()
    return str(caught.value)


def test_a_step_runs_and_fills_every_ranks_layout(group):
    step = Step()
    step.update(group)
    step.dispatch(group)
    step.combine(group)
    for r in range(R):
        assert step.layout[r].struct.receivedTotal == 2
        assert list(step.layout[r].source_rank_counters) == [1, 1]
        assert np.all(step.y[r] == 0.5 * (r + 1) * 2)


def test_a_rejected_update_names_the_lowest_rank_whose_routing_is_wrong(group):
    step = Step()
    step.idx[1][0, 1] = 9
    text = message(ep.InvalidArgumentError, lambda: step.update(group))
    assert text.startswith("epGroupUpdateAll: rank 1: invalid argument: inputs[1].topkIdx[0][1] = 9"), text
    step.idx[0][0, 0] = 3
    text = message(ep.InvalidArgumentError, lambda: step.update(group))
    assert text.startswith("epGroupUpdateAll: rank 0: invalid argument: inputs[0].topkIdx token 0 names expert 3 twice"), text


def test_a_dispatch_after_a_rejected_update_names_the_lowest_rank(group):
    step = Step()
    step.update(group)
    step.idx[1][0, 1] = 9
    message(ep.InvalidArgumentError, lambda: step.update(group))
    text = message(ep.InvalidUsageError, lambda: step.dispatch(group))
    assert text.startswith("epGroupDispatchAll: rank 0: call out of order: the last update of this handle failed"), text
    # The update's error, quoted, names the routing as epUpdateInputs_t does.
    assert "rejected its call: invalid argument: inputs[1].topkIdx[0][1] = 9; must be -1 or in [0, 4))" in text, text


def test_a_rejected_dispatch_names_the_rank_whose_tensor_is_wrong(group):
    step = Step()
    step.update(group)
    step.received[1] = np.zeros((L, R * B, H + 1), np.float32)
    text = message(ep.InvalidArgumentError, lambda: step.dispatch(group))
    assert text.startswith("epGroupDispatchAll: rank 1: invalid argument: outputs[1].tokens"), text
    step.x[0] = np.zeros((B + 1, H), np.float32)
    text = message(ep.InvalidArgumentError, lambda: step.dispatch(group))
    assert text.startswith("epGroupDispatchAll: rank 0: invalid argument: inputs[0].tokens"), text
    step.x[0] = np.zeros((B, H), np.float32)
    step.received[1] = np.zeros((L, R * B, H), np.float32)
    step.dispatch(group)


def test_a_rejected_combine_names_the_rank_whose_tensor_is_wrong(group):
    step = Step()
    step.update(group)
    step.dispatch(group)
    step.y[1] = np.zeros((B, H), np.int32)
    text = message(ep.InvalidArgumentError, lambda: step.combine(group))
    assert text.startswith("epGroupCombineAll: rank 1: invalid argument: outputs[1].tokens"), text


def test_a_masked_ranks_arguments_are_not_read_nor_its_layout_written(group):
    step = Step()
    call("epGroupDeactivateRank", group, 1)
    step.skip = {1}
    step.layout[1].struct.receivedTotal = -7
    step.update(group)
    step.dispatch(group)
    step.combine(group)
    assert step.layout[0].struct.receivedTotal == 1  # its own row for expert 0; rank 1 receives nothing
    assert step.layout[1].struct.receivedTotal == -7
    assert np.all(step.y[0] == 0.5)
    buffers = _LayoutBuffers(L, R)
    call("epGroupGetLayoutInfo", group, 0, ctypes.byref(buffers.struct))
    assert buffers.struct.receivedTotal == 1
    # The masked rank received nothing: its layout info is all zeros, as a GPU group reports it.
    buffers.struct.receivedTotal = -7
    call("epGroupGetLayoutInfo", group, 1, ctypes.byref(buffers.struct))
    assert buffers.struct.receivedTotal == 0


def test_a_dispatch_after_the_mask_changed_is_the_groups_refusal(group):
    step = Step()
    step.update(group)
    call("epGroupDeactivateRank", group, 1)
    text = message(ep.InvalidUsageError, lambda: step.dispatch(group))
    assert text.startswith("epGroupDispatchAll: call out of order: the active ranks went from"), text
    call("epGroupCleanRanks", group, 3)
    step.update(group)
    step.dispatch(group)
    assert step.layout[1].struct.receivedTotal == 2
