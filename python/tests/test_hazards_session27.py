"""Hazards a PyTorch integrator's probe met (session 27), each now a named error, on the CPU backend:

- ``copy.copy`` of a group or of a handle of its own shared the library's object: collecting the
  copy destroyed the original's group (or step), whose next call then failed; ``deepcopy`` and
  ``pickle`` raised a bare ``TypeError`` about a lock;
- a result's ``layout`` read after ``close()`` raised an ``InvalidArgumentError`` about a NULL
  group where every other call says the group is closed;
- ``NCCLGroup`` with the default ``device=None`` on a PyTorch without CUDA let PyTorch's
  ``AssertionError`` escape;
- routing errors of a group's calls named the C structs' fields (``call.topkIdx[0][1]``)."""

import copy
import gc
import pickle

import numpy as np
import pytest
import torch

import expert_parallel as ep


def group(**overrides):
    settings = dict(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32")
    settings.update(overrides)
    return ep.VirtualGroup(**settings)


def step():
    x = np.arange(2 * 2 * 8, dtype=np.float32).reshape(2, 2, 8)
    idx = np.array([[[0, 1], [2, 3]], [[3, 0], [1, -1]]], np.int32)
    w = np.full((2, 2, 2), 0.5, np.float32)
    return x, idx, w


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_group_is_not_copied_and_the_original_keeps_working(how):
    g = group()
    with pytest.raises(ep.NotCopyableError, match=r"VirtualGroup: cannot be copied or pickled; it owns the library's group"):
        how(g)
    gc.collect()
    x, idx, w = step()
    out = g.dispatch(x, idx, w)
    fresh = group()
    expected = fresh.dispatch(x, idx, w)
    assert all(np.array_equal(a, b) for a, b in zip(out.tokens, expected.tokens))
    assert out.layout == expected.layout


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_handle_is_not_copied_and_its_step_stays_live(how):
    g = group()
    h = g.handle()
    with pytest.raises(ep.NotCopyableError, match=r"Handle: cannot be copied or pickled; it names one step"):
        how(h)
    gc.collect()
    x, idx, w = step()
    out = g.dispatch(x, idx, w, handle=h)
    assert out.handle is h and out.layout[0].received_total == 4


def test_a_dispatch_result_copies_shallowly_but_not_deeply():
    g = group()
    out = g.dispatch(*step())
    assert copy.copy(out).handle is out.handle
    with pytest.raises(ep.NotCopyableError, match="Handle: cannot be copied"):
        copy.deepcopy(out)
    # Python's own convention for what cannot be pickled, which callers catch (torch's inductor too).
    with pytest.raises(TypeError):
        pickle.dumps(out)
    assert issubclass(ep.NotCopyableError, ep.InvalidUsageError)


def test_a_results_layout_after_close_says_the_group_is_closed():
    g = group()
    out = g.dispatch(*step())
    g.close()
    with pytest.raises(ep.InvalidUsageError, match="the group is closed"):
        out.layout


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a PyTorch without CUDA does")
@pytest.mark.parametrize("device", [None, "cuda"])
def test_an_nccl_group_on_the_current_device_without_cuda_gets_the_librarys_error(device):
    with pytest.raises(ep.ExpertParallelError) as caught:
        ep.NCCLGroup(4, 16, 2, 4, rank=0, ranks=2, unique_id=bytes(128), device=device)
    assert isinstance(caught.value, (ep.NcclError, ep.CudaError)), repr(caught.value)


@pytest.mark.parametrize("stacked", [True, False])
def test_routing_errors_name_the_keyword_and_the_entry(stacked):
    g = group()
    x, idx, w = step()
    idx[1, 1, 0] = 9
    with pytest.raises(ep.InvalidArgumentError) as caught:
        g.dispatch(x, idx, w) if stacked else g.dispatch(list(x), list(idx), list(w))
    text = str(caught.value)
    assert "rank 1: invalid argument: topk_idx[token 1, column 0] = 9; must be -1 or in [0, 4)" in text, text
    idx[1, 1, 0], idx[1, 0, 1] = 1, 3
    with pytest.raises(ep.InvalidArgumentError, match=r"rank 1: invalid argument: topk_idx token 0 names expert 3 twice"):
        g.dispatch(x, idx, w) if stacked else g.dispatch(list(x), list(idx), list(w))
    assert "topkIdx" not in str(caught.value) and "call." not in str(caught.value)


def test_argument_names_rename_every_form_of_the_c_fields():
    from expert_parallel.errors import argument_names

    assert argument_names("rank 1: invalid argument: call.topkIdx[3][1] = 9") == "rank 1: invalid argument: topk_idx[token 3, column 1] = 9"
    assert argument_names("inputs[1].topkIdx.dtype = f32; must be i32 or i64") == "topk_idx[1].dtype = f32; must be i32 or i64"
    assert argument_names("topkIdx[rank 1][0][2] = 300; must be -1 or in [0, 8)") == "topk_idx[rank 1][token 0, column 2] = 300; must be -1 or in [0, 8)"
    assert argument_names("input.topkWeights: NULL") == "topk_weights: NULL"
    assert argument_names("expertOutputs.shape") == "expert_outputs.shape"
    assert argument_names("topk_idx[0][1][2]") == "topk_idx[0][1][2]"   # (three subscripts: not a rank's entry)
    # A collective call's entry r of its arrays: the failing rank's own, a peer's, the device status's.
    assert argument_names("rank 1: invalid argument: inputs[1].topkIdx[0][1] = 9") == "rank 1: invalid argument: topk_idx[token 0, column 1] = 9"
    assert argument_names("rank 1: invalid argument: inputs[1].topkIdx token 0 names expert 3 twice") == "rank 1: invalid argument: topk_idx token 0 names expert 3 twice"
    assert (argument_names("rank 0: rank 0 did nothing because rank 1 rejected its call: invalid argument: inputs[1].topkIdx[0][1] = 9")
            == "rank 0: rank 0 did nothing because rank 1 rejected its call: invalid argument: topk_idx[rank 1][token 0, column 1] = 9")
    assert argument_names("invalid argument: inputs[1].topkIdx[0][2] = 300") == "invalid argument: topk_idx[rank 1][token 0, column 2] = 300"
    assert argument_names("rank 0 did nothing because rank 1 rejected its call: its inputs[1].topkIdx was invalid") == \
        "rank 0 did nothing because rank 1 rejected its call: its topk_idx[1] was invalid"


@pytest.mark.parametrize("own_handle", [False, True])
def test_a_call_refused_while_a_send_only_call_is_open_leaves_the_step(own_handle):
    """The library refuses a data-path call until complete(); the package refused it after
    voiding its handle (the combine then named a step that never ran)."""
    g = group()
    x, idx, w = step()
    h = g.handle() if own_handle else None
    out = g.dispatch(x, idx, w, handle=h, send_only=True)
    with pytest.raises(ep.InvalidUsageError, match=r"complete\(\) the pending send-only dispatch first"):
        g.dispatch(x, idx, w, handle=h)
    with pytest.raises(ep.InvalidUsageError, match=r"complete\(\) the pending send-only dispatch first"):
        g.combine(out.tokens, out.handle)
    out.hook()
    combined = g.combine(out.tokens, out.handle)
    fresh = group()
    first = fresh.dispatch(x, idx, w)
    expected = fresh.combine(first.tokens, first.handle)
    assert all(np.array_equal(a, b) for a, b in zip(combined, expected))


@pytest.mark.parametrize("stacked", [True, False])
def test_routing_outputs_for_a_layout_that_receives_none_are_refused(stacked):
    g = group()   # LL expert-major: no received routing
    x, idx, w = step()
    tokens = np.zeros((2, *g.recv_shape), np.float32)
    routing = np.zeros((2, 2, 2), np.int32), np.zeros((2, 2, 2), np.float32)
    out = (tokens, *routing) if stacked else (list(tokens), list(routing[0]), list(routing[1]))
    with pytest.raises(ep.InvalidArgumentError, match=r"out topk_idx: given; must be None: layout 'expert_major' receives no routing"):
        g.dispatch(x, idx, w, out=out)


def test_a_failed_complete_leaves_no_pending_call_in_the_package(monkeypatch):
    """The library takes its pending call when complete() starts (a CUDA error enqueueing the
    receiving half fails the call after that): the package must not keep refusing calls."""
    import expert_parallel.group as group_module

    g = group()
    x, idx, w = step()
    g.dispatch(x, idx, w, send_only=True)
    real = group_module.call

    def failing(name, *arguments):
        real(name, *arguments)
        if name == "epGroupComplete":
            raise ep.CudaError("epGroupComplete: a launch failed (made up by the test)")

    monkeypatch.setattr(group_module, "call", failing)
    with pytest.raises(ep.CudaError):
        g.complete()
    monkeypatch.setattr(group_module, "call", real)
    out = g.dispatch(x, idx, w)
    assert out.layout[0].received_total == 4
