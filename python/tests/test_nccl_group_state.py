"""NCCLGroup's state through refused and out-of-order calls (one rank over CPU tensors, its library
calls recorded): a refused complete() or dispatch leaves the pending call and the slot rotation as
they were, a dispatch of another step keeps the own step's early update, a closed group says so,
and a masked rank's error names no clean() the group lacks."""

import ctypes

import pytest

import expert_parallel as ep
from expert_parallel import _abi, nccl_group

torch = pytest.importorskip("torch")

from test_nccl_group_calls import recorded, step  # noqa: E402,F401
from test_torch_nccl_rank import inputs, rank_group  # noqa: E402,F401


def test_complete_with_a_stream_of_the_wrong_kind_leaves_the_send_only_call_pending(recorded):
    # complete(stream="cuda:0") is refused before epComplete runs (the stream is read for its
    # arguments), but its finally cleared _open_send_only: the package then thinks nothing is
    # pending while the library still holds the send-only dispatch; its hook refuses to complete it.
    group, calls = recorded()
    del group._raw   # (the class's _raw: _fast.raw_stream, whose stream check runs on the CPU too)
    x, idx, w = step(group, 4, 1)
    out = group.dispatch(x, idx, w, send_only=True)
    calls.clear()
    with pytest.raises(ep.InvalidArgumentError, match="stream: a str"):
        group.complete(stream="cuda:0")
    assert not any(name == "epComplete" for name, _ in calls)
    assert group._open_send_only == "dispatch"   # still pending, as in the library
    out.hook()                                   # the hook still completes it
    assert calls[-1][0] == "epComplete"


def test_a_dispatch_of_another_step_keeps_the_own_steps_update_pending(recorded):
    # update() starts the group's own step early; a dispatch of a handle of its own in between
    # (its own step untouched, in the library too) dropped the pending update: the own step's
    # dispatch(x, None, w) was then refused as having no routing.
    group, calls = recorded()
    x, idx, w = step(group, 4, 2)
    own = ep.Handle(group, ctypes.c_void_p(0x5000))
    group.update(idx)                             # the own step, started early
    group.dispatch(x, idx, w, handle=own)         # another step's dispatch
    calls.clear()
    out = group.dispatch(x, None, w)              # the own step's dispatch, with update()'s routing
    ((name, (d,)),) = calls
    assert name == "epGroupDispatchStacked" and d.step is None and not d.topkIdx.data
    assert out.handle.tokens == 4


def test_a_dispatch_the_library_refuses_takes_no_buffer_slot(recorded):
    # As a VirtualGroup's (group.py: "the rotation moves on once the library took the call"): a
    # refused dispatch runs nothing, so the next dispatch must not reuse the slot of a live step.
    group, calls = recorded()
    x, idx, w = step(group, 4, 3)
    own = ep.Handle(group, ctypes.c_void_p(0x5000))
    live = group.dispatch(x, idx, w, handle=own)   # slot 0
    assert live.handle.slot == 0 and group._next_slot == 1
    real = group._fn_dispatch_stacked
    group._fn_dispatch_stacked = lambda *a: _abi.INVALID_ARGUMENT
    with pytest.raises(ep.ExpertParallelError):
        group.dispatch(x, idx, w)
    group._fn_dispatch_stacked = real
    assert group._next_slot == 1
    group.dispatch(x, idx, w)                      # slot 1, as on a VirtualGroup
    group.combine(live.expert_outputs, own)        # slot 0 still the live step's


def test_a_closed_group_with_a_pending_send_only_call_says_it_is_closed(recorded, monkeypatch):
    # After close() with a send-only dispatch pending, dispatch() said "complete() the pending
    # send-only dispatch first (its result's hook(), or group.complete())", and both of those
    # then refuse with "the group is closed": the error sends the caller to a call that cannot run.
    from expert_parallel import _group_base

    group, calls = recorded()
    monkeypatch.setattr(_group_base, "call", lambda name, *arguments: calls.append((name, arguments)))
    x, idx, w = step(group, 4, 4)
    out = group.dispatch(x, idx, w, send_only=True)
    group.close()
    with pytest.raises(ep.InvalidUsageError, match="the group is closed"):
        out.hook()
    with pytest.raises(ep.InvalidUsageError, match="the group is closed"):
        group.dispatch(x, idx, w)
    with pytest.raises(ep.InvalidUsageError, match="the group is closed"):
        group.update(idx)


def test_the_masked_rank_error_of_an_nccl_rank_names_no_clean_it_lacks(rank_group, monkeypatch):
    # docs/torch.md (Limits) and the ops' InactiveRankError tell the caller to group.clean() the
    # masked ranks; an NCCLGroup has no clean() (epGroupCleanRanks is not offered for NCCL ranks).
    import gc

    from expert_parallel import _library
    from expert_parallel.torch import Exchange

    group = rank_group(layout="flat")
    exchange = Exchange(group)
    monkeypatch.setattr(nccl_group.NCCLGroup, "active_ranks", property(lambda self: []))
    monkeypatch.setattr(_library, "mask_changes", _library.mask_changes + 1)
    x, idx, w = inputs(4, 8, 32, 3, torch.float32, 9)
    message = None
    try:
        exchange.dispatch(x, idx, w)
    except ep.InactiveRankError as error:
        message = str(error)
    exchange.close()
    gc.collect()
    assert message is not None
    assert not hasattr(group, "clean")
    assert "clean()" not in message, message


def test_an_int_stream_handle_is_taken_as_torch_stream_for_what_follows_the_call(monkeypatch):
    """stream= takes an int CUstream handle (the calls read it as one), but what follows the call
    (record_event's event, wait_event, record_stream of a send-only call's tensors, HT backward's
    copy on the stream) took the int itself as a torch stream: Event.record(int) raised after the
    library had run the call. It is now torch's ExternalStream over the handle (0: the default
    stream). (CPU torch has no CUDA streams: stand-ins show what is made.)"""
    from expert_parallel import _fast

    made = []
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda handle, device=None: made.append(("external", handle, device)) or made[-1])
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: made.append(("default", device)) or made[-1])
    assert _fast.torch_stream(0, 0x1234) == ("external", 0x1234, 0)
    assert _fast.torch_stream(1, 0) == ("default", 1)

    class Stream:
        cuda_stream = 0x99

    given = Stream()
    assert _fast.torch_stream(0, given) is given
