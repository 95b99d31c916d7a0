"""The package's data path at engine speed, on the CPU backend (the GPU's in test_gpu.py):
several live handles per group, stacked per-rank arrays, per-expert counts, the group's buffer
slots and the caller's `out=` tensors, send-only calls and their hooks."""

import numpy as np
import pytest

import expert_parallel as ep

R, E, H, K, B = 4, 16, 8, 2, 6


def routing(seed, tokens=B):
    rng = np.random.default_rng(seed)
    idx = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)]) for _ in range(R)]).astype(np.int32)
    xs = rng.standard_normal((R, tokens, H)).astype(np.float32)
    weights = rng.random((R, tokens, K)).astype(np.float32)
    return xs, idx, weights


def group(**extra):
    return ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32", **extra)


def alone(step):
    """Dispatch and combine of `step` on a fresh group: (received tokens, counts, combined)."""
    with group() as g:
        out = g.dispatch(*step)
        combined = g.combine([t.copy() for t in out.tokens], out.handle)
        return [t.copy() for t in out.tokens], out.expert_counts.copy(), [c.copy() for c in combined], out.layout


def test_stacked_arrays_give_the_same_bits_as_lists():
    xs, idx, w = routing(1)
    with group() as g:
        listed = g.dispatch(list(xs), list(idx), list(w))
        tokens = [t.copy() for t in listed.tokens]
        stacked = g.dispatch(xs, idx, w)
        assert all(np.array_equal(a, b) for a, b in zip(tokens, stacked.tokens))
        assert stacked.received.shape == (R,) + g.recv_shape


def test_expert_counts_equal_the_layout_info_without_asking_for_it():
    xs, idx, w = routing(2)
    with group() as g:
        out = g.dispatch(xs, idx, w)
        assert out.expert_counts.dtype == np.int32 and out.expert_counts.shape == (R, E // R)
        assert out.expert_source_counts.shape == (R, E // R, R)
        for r, info in enumerate(out.layout):
            assert out.expert_counts[r].tolist() == info.expert_counters
            assert out.expert_source_counts[r].tolist() == info.expert_source_counters


def test_four_handles_interleaved_match_each_step_run_alone():
    steps = [routing(10 + i) for i in range(4)]
    want = [alone(s) for s in steps]
    with group(buffer_slots=4) as g:
        handles = [g.handle() for _ in steps]
        outs = [g.dispatch(*s, handle=h) for s, h in zip(steps, handles)]
        # Combine in reverse order: each handle's routing is its own.
        for i in reversed(range(4)):
            ys = [t.copy() for t in outs[i].tokens]
            got = g.combine(ys, handles[i])
            assert all(np.array_equal(a, b) for a, b in zip(got, want[i][2])), f"step {i}"
            assert outs[i].layout == want[i][3]
        for h in handles:
            h.release()
        with pytest.raises(ep.InvalidUsageError, match="released"):
            g.combine([t.copy() for t in outs[0].tokens], handles[0])


def test_a_handle_dispatches_again_with_its_routing_for_the_backward_pass():
    xs, idx, w = routing(3)
    with group() as g, g.handle() as h:
        forward = g.dispatch(xs, idx, w, handle=h)
        first = [t.copy() for t in forward.tokens]
        other = g.dispatch(*routing(4))   # the group's own step moves on; h keeps its routing
        again = g.dispatch(xs, None, w, handle=h, direction="backward")
        assert all(np.array_equal(a, b) for a, b in zip(first, again.tokens))
        assert other.handle is not h
    with pytest.raises(ep.InvalidArgumentError, match="topk_idx: None"):
        group().dispatch(xs, None, w)


def test_buffer_slots_are_reused_in_turn_and_out_takes_the_callers_arrays():
    xs, idx, w = routing(5)
    with group(buffer_slots=2) as g:
        a = g.dispatch(xs, idx, w)
        b = g.dispatch(xs, idx, w)
        c = g.dispatch(xs, idx, w)
        assert a.handle.slot == 0 and b.handle.slot == 1 and c.handle.slot == 0
        assert a.tokens[0] is c.tokens[0] or np.shares_memory(a.tokens[0], c.tokens[0])
        assert not np.shares_memory(a.tokens[0], b.tokens[0])
        mine = [np.zeros(g.recv_shape, np.float32) for _ in range(R)]
        d = g.dispatch(xs, idx, w, out=(mine, None, None))
        assert all(t is m for t, m in zip(d.tokens, mine))
        assert all(np.array_equal(m, t) for m, t in zip(mine, c.tokens))
        combined = [np.full((B, H), np.nan, np.float32) for _ in range(R)]
        got = g.combine(mine, d.handle, out=combined)
        assert all(x is y for x, y in zip(got, combined)) and not any(np.isnan(c).any() for c in combined)


def test_send_only_runs_whole_on_the_cpu_and_its_hook_completes():
    xs, idx, w = routing(6)
    want = alone((xs, idx, w))
    with group() as g:
        out = g.dispatch(xs, idx, w, send_only=True)
        out.hook()
        combined, hook = g.combine([t.copy() for t in out.tokens], out.handle, send_only=True)
        hook()
        assert all(np.array_equal(a, b) for a, b in zip(combined, want[2]))
        with pytest.raises(ep.InvalidUsageError, match="complete"):
            g.complete()   # nothing is pending


def test_a_hook_runs_once_and_never_completes_a_later_call():
    # A second call of a hook (or one after group.complete()) used to reach complete() and, with a
    # later send-only call open, complete that call instead of naming the mistake.
    xs, idx, w = routing(8)
    with group() as g:
        first = g.dispatch(xs, idx, w, send_only=True)
        first.hook()
        with pytest.raises(ep.InvalidUsageError, match="hook\\(\\): this send-only dispatch was completed already"):
            first.hook()
        combined, hook = g.combine([t.copy() for t in first.tokens], first.handle, send_only=True)
        with pytest.raises(ep.InvalidUsageError, match="this send-only dispatch was completed already"):
            first.hook()   # stale: the combine is the open call, and stays open
        with pytest.raises(ep.InvalidUsageError, match="complete\\(\\) the pending send-only combine first"):
            g.dispatch(xs, idx, w)
        hook()
        second = g.dispatch(xs, idx, w, send_only=True)
        g.complete()
        with pytest.raises(ep.InvalidUsageError, match="this send-only dispatch was completed already"):
            second.hook()
        with pytest.raises(ep.InvalidUsageError, match="this send-only combine was completed already"):
            hook()


def test_wrong_arguments_of_the_new_calls_are_named():
    xs, idx, w = routing(7)
    with group() as g:
        with pytest.raises(ep.InvalidArgumentError, match=r"xs: shape \[4, 6, 9\]"):
            g.dispatch(np.zeros((R, B, H + 1), np.float32), idx, w)
        with pytest.raises(ep.InvalidArgumentError, match="one per rank"):
            g.dispatch(list(xs)[:2], idx, w)
        with pytest.raises(ep.InvalidArgumentError, match="buffer_slots"):
            group(buffer_slots=0)
        with pytest.raises(ep.InvalidArgumentError, match=r"out: a list of 1; must be a tuple \(tokens, topk_idx, topk_weights\)"):
            g.dispatch(xs, idx, w, out=[1])
        other = group()
        with pytest.raises(ep.InvalidArgumentError, match="handle"):
            g.dispatch(xs, idx, w, handle=other.handle())


def test_tuning_knobs_are_checked_by_name():
    with pytest.raises(ep.InvalidArgumentError, match="tuning\\['unroll'\\]: not a tuning knob"):
        group(tuning={"unroll": 2})
    with pytest.raises(ep.InvalidArgumentError, match="tuning"):
        group(tuning=[4])
    with pytest.raises(ep.InvalidArgumentError, match="tuning\\['pipeline_depth'\\]"):
        group(tuning={"pipeline_depth": 0})
    with pytest.raises(ep.InvalidArgumentError, match="tuning\\['update_chunk_tokens'\\]"):
        group(tuning={"update_chunk_tokens": 0})
    with pytest.raises(ep.InvalidArgumentError, match="tuning\\['fused_update'\\]=1 .*must be True or False"):
        group(tuning={"fused_update": 1})
    with pytest.raises(ep.InvalidArgumentError, match="tuning\\['full_grid'\\]=0 .*must be True or False"):
        group(tuning={"full_grid": 0})
    with pytest.raises(ep.InvalidArgumentError, match="tuning\\['serial_launches'\\]=1 .*must be True or False"):
        group(tuning={"serial_launches": 1})
    # The C fields: 0 the default, 1 and 2 the explicit choices (launches: 1 dependent, 2 plain).
    from expert_parallel import _config
    assert (_config.tuning({"serial_launches": True}).launches, _config.tuning({"serial_launches": False}).launches) == (2, 1)
    assert _config.tuning(None).launches == 0
    with group(tuning={"update_chunk_tokens": 64, "fused_update": False, "full_grid": True, "serial_launches": True}) as g:
        assert g.dispatch(*routing(8)).expert_counts.shape == (R, E // R)
    # The CPU backend has no kernels: its tuning is accepted and has no effect.
    with group(tuning={"pipeline_depth": 2, "rows_in_flight": 4}) as g:
        assert g.dispatch(*routing(8)).expert_counts.shape == (R, E // R)


def test_a_combine_whose_slot_was_reused_is_refused_where_it_reads_the_slot():
    """HT expert-major combines with the per-slot weights its dispatch delivered into the slot: once
    a later dispatch reuses that slot they are gone, so the combine is refused, never wrong."""
    ht = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32", algorithm="ht",
                         layout="expert_major_padded", alignment=2, buffer_slots=2)
    xs, idx, w = routing(9)
    handles = [ht.handle() for _ in range(3)]
    outs = [ht.dispatch(xs, idx, w, handle=h) for h in handles]   # the third reuses the first's slot
    ys = [np.zeros(ht.recv_shape, np.float32) for _ in range(R)]
    ht.combine(ys, handles[1])   # its slot is still its own
    with pytest.raises(ep.InvalidUsageError, match="buffer slot 0, which a later dispatch has used"):
        ht.combine(ys, handles[0])
    ht.combine(ys, handles[2])
    assert outs[2].handle is handles[2]


def test_a_handle_outliving_its_group_is_still_released():
    g = group()
    h = g.handle()
    g.dispatch(*routing(11), handle=h)
    g.close()
    h.release()   # frees the step, which kept the library's group alive
    assert h.released
    from expert_parallel._library import call
    with pytest.raises(ep.InvalidArgumentError, match="must be a live epStep_t"):
        call("epStepDestroy", h._pointer)   # it is gone already
    with pytest.raises(ep.InvalidUsageError, match="closed"):
        g.dispatch(*routing(11))


def test_a_handle_of_its_own_dropped_unreleased_frees_its_step_and_the_group_steps_handles_hold_nothing():
    """group.handle()'s step is freed when the handle is collected; a dispatch's handle of the
    group's own step (made per call, without a finaliser) owns no step and is still a Handle."""
    import gc

    from expert_parallel._library import call
    with group() as g:
        h = g.handle()
        g.dispatch(*routing(12), handle=h)
        pointer = h._pointer
        del h
        gc.collect()
        with pytest.raises(ep.InvalidArgumentError, match="must be a live epStep_t"):
            call("epStepDestroy", pointer)   # freed when the handle went
        out = g.dispatch(*routing(12))
        assert isinstance(out.handle, ep.Handle) and not out.handle.own and out.handle._pointer is None
        assert not hasattr(type(out.handle), "__del__")   # nothing to free per call
        g.combine([t.copy() for t in out.tokens], out.handle)


def test_a_callers_changes_to_a_results_lists_reach_no_later_result():
    """The per-rank lists a dispatch or combine returns are the caller's: replacing an entry (say,
    by the expert's output) leaves the next result into the same buffer slot as it should be."""
    torch = pytest.importorskip("torch")
    with group(buffer_slots=1) as g:
        xs, idx, w = (torch.from_numpy(a) for a in routing(13))
        out = g.dispatch(xs, idx, w)
        received = [t.clone() for t in out.tokens]
        out.tokens[0] = torch.zeros(1)   # the caller's own list
        combined = g.combine(out.received, out.handle)
        combined[1] = None
        again = g.dispatch(xs, idx, w)
        assert all(torch.equal(a, b) for a, b in zip(again.tokens, received))
        assert all(isinstance(c, torch.Tensor) and c.shape == (B, H) for c in g.combine(again.received, again.handle))
