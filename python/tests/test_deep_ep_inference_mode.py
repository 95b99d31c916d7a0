"""The DeepEP adapter's in-place updates left for a dispatch's receiving half (the cumulative
stats, FP8 scales) run in whatever inference mode the caller is in when it comes: torch refuses an
in-place update of an inference tensor outside inference mode, where DeepEP's kernels write by
address in any mode."""

import torch

import deep_ep_reference as ref
from expert_parallel.compat.deep_ep import Buffer, run_ranks

R, E, H, K = 2, 8, 128, 2
TOKENS = [5, 3]
L = E // R


def _buffers():
    return Buffer.virtual(R, timeout=30)


def test_cumulative_stats_made_under_inference_mode_are_updated_outside_it():
    # DeepEP's kernel adds into the stats tensor by address, whatever mode made it (a serving
    # engine's warm-up under torch.inference_mode, then an RL trainer's step outside it). Here the
    # adapter's stats.add_ raised torch's "Inplace update to inference tensor outside InferenceMode"
    # after the dispatch had run, failing the round on every rank.
    xs, idx, _ = ref.make_inputs(1, TOKENS, E, H, K)
    want = ref.ll_dispatch(xs, idx, E, 8)
    with torch.inference_mode():
        stats = [torch.zeros(L, dtype=torch.int32) for _ in range(R)]
    buffers = _buffers()
    try:
        for hook in (False, True):
            def flow(b):
                out = b.low_latency_dispatch(xs[b.rank], idx[b.rank], 8, E, use_fp8=False,
                                             cumulative_local_expert_recv_stats=stats[b.rank], return_recv_hook=hook)
                if hook:
                    out[4]()
            run_ranks(buffers, flow)
        assert [s.tolist() for s in stats] == [[2 * c for c in want[r]["counts"]] for r in range(R)]
    finally:
        for b in buffers:
            b.destroy()


def test_a_hooked_fp8_dispatch_under_inference_mode_is_received_by_a_later_call_outside_it():
    # A send-only FP8 dispatch made under inference_mode whose hook is never called (an engine's
    # last decode step) is received by the next call on its group; that call, outside inference
    # mode (a trainer's step), filled the pending dispatch's scales, inference tensors, in place:
    # torch's RuntimeError, so the later call failed on every rank.
    xs, idx, ws = ref.make_inputs(2, TOKENS, E, H, K)
    buffers = _buffers()
    try:
        def pending(b):
            with torch.inference_mode():
                (codes, scales), count, _, _, hook = b.low_latency_dispatch(xs[b.rank], idx[b.rank], 8, E, return_recv_hook=True)
            return scales, count   # hook dropped, never called

        held = run_ranks(buffers, pending)

        def later(b):
            (codes, scales), count, _, _, _ = b.low_latency_dispatch(xs[b.rank], idx[b.rank], 8, E)
            return scales.clone(), count.clone()

        again = run_ranks(buffers, later)
        for (s1, c1), (s2, c2) in zip(held, again):
            assert torch.equal(c1, c2)
            for e, c in enumerate(c2.tolist()):
                assert torch.equal(s1[e, :c], s2[e, :c])
    finally:
        for b in buffers:
            b.destroy()


def test_every_virtual_ranks_hook_waits_for_the_receiving_half_on_its_own_stream(monkeypatch):
    """A hook completes the send-only call on the calling thread's current stream, once, for every
    rank: the other ranks' hooks returned at once, so a rank whose thread has a stream of its own
    read its received rows before they were written there (the GPU's). The completing hook now
    records an event after it, and every rank's hook waits for it (on the CPU events are None:
    here they are stand-ins, recorded and waited on by name)."""
    from expert_parallel.compat.deep_ep import _buffer, _events

    recorded, waited = [], []

    def record(device):
        recorded.append(f"event {len(recorded)}")
        return recorded[-1]

    monkeypatch.setattr(_events, "record", record)
    monkeypatch.setattr(_events, "wait", lambda event, device: waited.append(event) if event is not None else None)
    xs, idx, _ = ref.make_inputs(3, TOKENS, E, H, K)
    buffers = _buffers()
    try:
        def flow(b):
            out = b.low_latency_dispatch(xs[b.rank], idx[b.rank], 8, E, use_fp8=False, return_recv_hook=True)
            return out[4]

        hooks = run_ranks(buffers, flow)
        before = len(recorded)
        waited.clear()
        for hook in hooks:
            hook()
        assert len(recorded) == before + 1   # one event, after the receiving half
        assert waited == [recorded[-1]] * R   # every rank's stream waits for it
    finally:
        for b in buffers:
            b.destroy()
