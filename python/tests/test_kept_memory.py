"""Memory the library reads or writes again in a later call, by the address an earlier call took,
while the caller may move or free it in between: LL expert-major's dispatch weights (NumPy too),
what a send-only combine's receiving half reads and writes (run at complete() on the GPU), and
HT expert-major's per-slot weights, which the group's combine must read from its own buffer,
not through the tensors a result handed out."""

import ctypes
import gc

import numpy as np
import pytest
import torch

import expert_parallel as ep
from test_nccl_group_calls import recorded  # noqa: F401  (the NCCL rank over CPU tensors, a fixture)
from test_tensor_memory import moved, step


def group(**overrides):
    settings = dict(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32", buffer_slots=1)
    settings.update(overrides)
    return ep.VirtualGroup(**settings)


def numpy_step():
    return tuple(np.ascontiguousarray(t.numpy()) for t in step())


def moved_numpy(array):
    """NumPy's resize(refcheck=False) as a caller might: the buffer grown (moved) and given its
    shape and values back, in a new place; the old one is freed (the step's reference is not
    counted). Returns the old address."""
    shape, before, saved = array.shape, array.__array_interface__["data"][0], array.copy()
    array.resize((1 << 20,), refcheck=False)
    array.resize(shape, refcheck=False)
    array[...] = saved
    assert array.__array_interface__["data"][0] != before
    return before


@pytest.mark.parametrize("stacked", [True, False])
def test_numpy_weights_moved_between_ll_dispatch_and_combine_are_read_where_they_are(stacked):
    """LL expert-major's combine reads the dispatch's topk_weights again: a NumPy array moved since
    was read at its old, freed address (the combined rows came out of whatever took it: x1000
    where the test refilled it), as torch tensors were before they were re-read."""
    x, idx, w = numpy_step()
    g = group()
    out = g.dispatch(x, idx, w)
    want = np.stack(g.combine(np.stack(out.tokens).copy(), out.handle))
    given = w.copy() if stacked else [a.copy() for a in w]
    out = g.dispatch(x, idx, given) if stacked else g.dispatch(list(x), list(idx), given)
    rows = np.stack(out.tokens).copy()
    target = given if stacked else given[0]
    moved_numpy(target)
    refill = [np.full(target.size, 1000.0, np.float32) for _ in range(256)]   # (takes the freed chunk back)
    got = np.stack(g.combine(rows, out.handle))
    del refill
    assert np.array_equal(got, want)


@pytest.mark.parametrize("stacked", [True, False])
def test_numpy_weights_reshaped_since_the_dispatch_are_named(stacked):
    x, idx, w = numpy_step()
    g = group()
    given = w.copy() if stacked else [a.copy() for a in w]
    out = g.dispatch(x, idx, given) if stacked else g.dispatch(list(x), list(idx), given)
    target = given if stacked else given[1]
    target.resize((target.shape[0] - 1,) + target.shape[1:], refcheck=False)
    name = "topk_weights" if stacked else r"topk_weights\[1\]"
    with pytest.raises(ep.InvalidArgumentError, match=rf"^{name}: a ndarray of shape .*must be the dispatch's .* float32, "
                       r"contiguous, which this combine reads again: the array was changed in place \(resize\(\)\)"):
        g.combine(np.stack(out.tokens).copy(), out.handle)


# -- a send-only combine's receiving half ----------------------------------------------------------
#
# On the GPU it is a kernel enqueued at complete(): it reads every rank's expert outputs, the
# weights and backward HT's weight gradients, and writes the combined rows into the targets the
# call was given. Only the weights' memory was kept: a `.data =` / `set_()` before complete()
# (Megatron's deallocate_output_tensor: `out.data = torch.empty(1)`) freed the rest. The CPU
# backend runs the call whole, so the tests watch the memory's lifetime.


def alive_after(tensor, how):
    held = tensor.untyped_storage()._weak_ref()
    moved(tensor, how)
    return not torch.UntypedStorage._expired(held)


@pytest.mark.parametrize("how", ["data", "set_"])
@pytest.mark.parametrize("what", ["expert outputs", "out", "weight gradients"])
def test_a_send_only_combine_keeps_the_memory_its_receiving_half_reads_and_writes(what, how):
    g = group(algorithm="ht" if what == "weight gradients" else "ll")
    x, idx, w = step()
    out = g.dispatch(x, idx, w)
    rows = torch.stack(out.tokens).clone()
    if what == "weight gradients":
        watched = torch.rand((2,) + tuple(g.recv_routing_shape))
        _, hook = g.combine(rows, out.handle, direction="backward", weight_gradients=watched, send_only=True)
    elif what == "out":
        targets = [torch.empty(3, 8), torch.empty(3, 8)]
        watched = targets[0]
        _, hook = g.combine(rows, out.handle, out=targets, send_only=True)
    else:
        watched = rows
        _, hook = g.combine(rows, out.handle, send_only=True)
    alive = alive_after(watched, how)
    hook()
    assert alive


@pytest.mark.parametrize("how", ["data", "set_"])
def test_a_send_only_combine_keeps_the_rows_it_made_for_a_step_dispatched_into_out(how):
    """A step dispatched into the caller's arrays has no slot: its combine makes the combined
    rows, which the receiving half writes; the caller holds them (the result) and may rebind
    them before complete()."""
    g = group()
    x, idx, w = step()
    received = [torch.zeros((2,) + tuple(g.recv_shape)), None, None]
    if g.recv_routing_shape is not None:
        received[1:] = [torch.zeros((2,) + tuple(g.recv_routing_shape), dtype=torch.int32), torch.zeros((2,) + tuple(g.recv_routing_shape))]
    out = g.dispatch(x, idx, w, out=tuple(received))
    assert out.handle.slot < 0
    combined, hook = g.combine(torch.stack(out.tokens).clone(), out.handle, send_only=True)
    alive = alive_after(combined[1], how)
    hook()
    assert alive


@pytest.mark.parametrize("how", ["data", "set_"])
def test_an_nccl_ranks_send_only_combine_keeps_its_out_memory(recorded, how):  # noqa: F811
    g, calls = recorded(dtype="f32", layout="rank_major")
    x, idx, w = torch.randn(3, g.hidden), torch.tensor([[0, 1, 2, 3]] * 3, dtype=torch.int32), torch.rand(3, g.top_k)
    out = g.dispatch(x, idx, w)
    target = torch.empty(3, g.hidden)
    calls.clear()
    _, hook = g.combine(out.tokens.clone(), out.handle, out=target, send_only=True)
    assert calls[-1][1][0].combinedTokens.data == target.data_ptr()   # where the receiving half writes
    alive = alive_after(target, how)
    hook()
    assert alive


# -- HT expert-major padded: the per-slot weights ----------------------------------------------------


@pytest.mark.parametrize("how", ["data", "set_"])
def test_a_per_rank_padded_combine_applies_the_received_weights_not_a_rebound_result_tensor(how):
    """The per-rank combine read the per-slot weights through the very tensors the result hands
    out as out.topk_weights: one rebound by the caller (.data =, set_()) was applied instead of
    the weights the dispatch received (the stacked combine reads the slot's address)."""
    settings = dict(algorithm="ht", layout="expert_major_padded", alignment=4)
    g, fresh = group(**settings), group(**settings)
    x, idx, w = step()
    want_out = fresh.dispatch(list(x), list(idx), list(w))
    rows = [t.clone() for t in want_out.tokens]
    want = fresh.combine(rows, want_out.handle)
    out = g.dispatch(list(x), list(idx), list(w))
    other = torch.full_like(out.topk_weights[0], 7.0)
    if how == "data":
        out.topk_weights[0].data = other
    else:
        out.topk_weights[0].set_(other)
    got = g.combine(rows, out.handle)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_send_only_combine_names_a_tensor_whose_detach_fails():
    """Keeping memory for the receiving half takes `.detach()` aliases of what the call was given
    before the call checks it: a dead vmap wrapper's .detach() raises (RuntimeError), where the
    call names it; it is kept as it is, named, and the group takes its next call."""
    from test_tensor_memory import WRAPPER

    g = group()
    x, idx, w = step()
    out = g.dispatch(x, idx, w)
    rows = torch.stack(out.tokens).clone()
    leaked = []
    torch.func.vmap(lambda u: (leaked.append(u), u * 1)[1])(rows.unsqueeze(0))
    with pytest.raises(ep.InvalidArgumentError, match="^expert_outputs: " + WRAPPER):
        g.combine(leaked[0], out.handle, send_only=True)
    combined, hook = g.combine(rows, out.handle, send_only=True)
    hook()
    assert torch.stack(list(combined)).abs().sum() > 0


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("how", ["data", "set_"])
def test_a_send_only_dispatch_into_out_keeps_the_memory_its_receiving_half_writes(how, stacked):
    """A send-only dispatch's receiving half (enqueued at complete() on the GPU) writes the
    received rows into `out=`: only its handle was kept."""
    g = group()
    x, idx, w = step()
    received = torch.zeros((2,) + tuple(g.recv_shape))
    if stacked:
        out = g.dispatch(x, idx, w, out=(received, None, None), send_only=True)
        watched = received
    else:
        rows = list(received.clone())
        out = g.dispatch(list(x), list(idx), list(w), out=(rows, None, None), send_only=True)
        watched = rows[1]
    alive = alive_after(watched, how)
    out.hook()
    assert alive


@pytest.mark.parametrize("how", ["data", "set_"])
def test_a_send_only_padded_combine_keeps_per_slot_weights_received_into_out(how):
    """HT expert-major padded's combine applies the per-slot weights its dispatch received: into
    the caller's arrays (`out=`), they are the caller's to drop or rebind before complete()."""
    g = group(algorithm="ht", layout="expert_major_padded", alignment=4)
    x, idx, w = step()
    routing = (2,) + tuple(g.recv_routing_shape)
    received = (torch.zeros((2,) + tuple(g.recv_shape)), torch.zeros(routing, dtype=torch.int32), torch.zeros(routing))
    out = g.dispatch(x, idx, w, out=received)
    assert out.handle.slot < 0
    _, hook = g.combine(torch.stack(out.tokens).clone(), out.handle, send_only=True)
    alive = alive_after(received[2], how)
    hook()
    assert alive


def step_is_live(pointer):
    """Whether the library still has the step at `pointer` (a destroyed one is refused by name)."""
    from expert_parallel import _abi
    from expert_parallel._library import load

    info = _abi.new(_abi.LayoutInfo)
    status = load().epStepGetLayoutInfo(pointer, 0, ctypes.byref(info))
    message = load().epGetLastErrorMessage().decode()
    assert status == _abi.SUCCESS or "must be a live epStep_t" in message, message
    return status == _abi.SUCCESS


def pending_combine(g):
    """A send-only combine of a step of its own, pending: (its handle, the hook, the step's pointer)."""
    x, idx, w = step()
    h = g.handle()
    out = g.dispatch(x, idx, w, handle=h)
    _, hook = g.combine(torch.stack(out.tokens).clone(), h, send_only=True)
    return h, hook, h._pointer


@pytest.mark.parametrize("call", ["dispatch", "combine"])
@pytest.mark.parametrize("how", ["release", "drop"])
def test_a_step_released_while_its_send_only_call_is_pending_goes_at_complete(call, how):
    """The receiving half of a send-only call (run at complete() on the GPU) reads the step's
    device words: a handle released (or dropped, a with block ended) before complete() freed
    them under it. The step now goes once complete() has enqueued the receiving half."""
    g = group()
    x, idx, w = step()
    h = g.handle()
    if call == "dispatch":
        out = g.dispatch(x, idx, w, handle=h, send_only=True)
        hook = out.hook
    else:
        out = g.dispatch(x, idx, w, handle=h)
        _, hook = g.combine(torch.stack(out.tokens).clone(), h, send_only=True)
    pointer = h._pointer
    if how == "release":
        h.release()
        assert h.released
    del h, out
    gc.collect()
    assert step_is_live(pointer)
    hook()
    assert not step_is_live(pointer)
    # A later step is released at once, as ever.
    later = g.handle()
    g.dispatch(x, idx, w, handle=later)
    later.release()
    assert not step_is_live(later._pointer)


@pytest.mark.parametrize("how", ["release", "drop", "drop the group"])
def test_a_group_closed_with_a_pending_send_only_call_releases_its_deferred_step(how):
    """A step whose release waits for complete() (above): the group closed (or dropped) instead,
    complete() refuses ("the group is closed"); the step must go with the group, not live on
    (keeping the library's group and its buffers)."""
    g = group()
    h, hook, pointer = pending_combine(g)
    if how != "drop":
        h.release()
    del h, hook
    if how == "drop the group":
        del g
    else:
        g.close()
    gc.collect()
    assert not step_is_live(pointer)


def test_a_refused_send_only_combine_keeps_nothing_alive():
    """What a send-only combine keeps is taken before its checks: one refused kept its handle
    (and its tensors) until a later send-only call."""
    g = group()
    x, idx, w = step()
    h = g.handle()
    out = g.dispatch(x, idx, w, handle=h)
    rows = torch.stack(out.tokens).clone()
    with pytest.raises(ep.InvalidArgumentError):
        g.combine(rows[:, :1], h, send_only=True)   # wrong shape: refused
    pointer = h._pointer
    del h, out
    gc.collect()
    assert not step_is_live(pointer)


def test_a_release_racing_complete_on_another_thread_is_not_lost(monkeypatch):
    """The release's test of the pending call and its deferral ran outside the group's lock: a
    release that had seen the pending call while complete() ran on another thread deferred
    the step after complete() had taken the deferred ones, and it was never released."""
    import threading

    from expert_parallel import _group_base

    g = group()
    h, hook, pointer = pending_combine(g)
    seen, done = threading.Event(), threading.Event()
    real_any = any

    def slow_any(iterable):   # holds the releasing thread between its test and its deferral
        result = real_any(iterable)
        seen.set()
        done.wait(5)
        return result

    monkeypatch.setattr(_group_base, "any", slow_any, raising=False)
    releaser = threading.Thread(target=h.release)
    releaser.start()
    assert seen.wait(5)
    monkeypatch.setattr(_group_base, "any", real_any, raising=False)
    completer = threading.Thread(target=hook)
    completer.start()
    completer.join(0.3)
    done.set()
    releaser.join()
    completer.join()
    gc.collect()
    assert not step_is_live(pointer)
