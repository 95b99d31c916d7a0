"""The CPU backend through the Python package equals the NumPy reference bit for bit: received
rows (in (source rank, token) order), received routing, counters, and combine, for every layout,
element type, index type and pass direction."""

import numpy as np
import pytest

import expert_parallel as ep
from reference import Reference, numpy_dtype, random_payload, random_routing

# (algorithm, layout, alignment)
LAYOUTS = [("ll", "expert_major", 1), ("ll", "rank_major", 1), ("ht", "flat", 1),
           ("ht", "expert_major_padded", 1), ("ht", "expert_major_padded", 4)]
# (ranks, experts, top_k, hidden, max_tokens)
SHAPES = [(1, 4, 2, 8, 3), (2, 8, 3, 16, 5), (4, 8, 2, 8, 6), (3, 12, 4, 24, 4), (4, 16, 8, 4, 7)]


def run_step(group, ref, rng, dtype, *, index_dtype=np.int32, direction="forward", minus_one_rate=0.1):
    """One dispatch + combine on `group`; returns (result, expected receive per rank, inputs)."""
    R, H = group.ranks, group.hidden
    xs = [random_payload(rng, (ref.tokens[r], H), dtype) for r in range(R)]
    idx = [i.astype(index_dtype) for i in ref.idx]
    out = group.dispatch(xs, idx, ref.weights)
    expected = [ref.receive(d, xs, dtype) for d in range(R)]
    return out, expected, xs, idx


def rows_in_use(e):
    """The receive rows a dispatch writes (the rest are unspecified: earlier steps' rows): every
    received row, and the padding rows of HT expert-major, which it writes too."""
    rows = set(e["selection_slot"].values()) | set(e["pair_row"].values())
    if e["topk_idx"] is not None and e["topk_idx"].ndim == 1:   # HT expert-major: padding included
        rows |= set(range(e["layout"]["received_total"]))
    return sorted(rows)


def check_receive(out, expected, ranks):
    for d in range(ranks):
        e = expected[d]
        rows = rows_in_use(e)
        assert out.tokens[d].dtype == e["tokens"].dtype
        got = out.tokens[d].reshape(-1, out.tokens[d].shape[-1])[rows]
        want = e["tokens"].reshape(-1, e["tokens"].shape[-1])[rows]
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=f"rank {d}: tokens")
        if e["topk_idx"] is None:
            assert out.topk_idx is None and out.topk_weights is None
        else:
            width = 1 if e["topk_idx"].ndim == 1 else e["topk_idx"].shape[-1]   # a row's routing entries
            np.testing.assert_array_equal(out.topk_idx[d].reshape(-1, width)[rows], e["topk_idx"].reshape(-1, width)[rows],
                                          err_msg=f"rank {d}: topk_idx")
            np.testing.assert_array_equal(out.topk_weights[d].reshape(-1, width)[rows].view(np.uint32),
                                          e["topk_weights"].reshape(-1, width)[rows].view(np.uint32), err_msg=f"rank {d}: topk_weights")
        counts = e["layout"]["expert_counters"]
        assert list(out.expert_counts[d]) == counts, f"rank {d}: expert_counts"
        assert out.expert_source_counts[d].tolist() == e["layout"]["expert_source_counters"], f"rank {d}: expert_source_counts"
        layout = out.layout[d]
        for field, value in e["layout"].items():
            assert getattr(layout, field) == value, f"rank {d}: {field}"


def check_combine(group, ref, out, expected, dtype, ys=None, rng=None):
    """Combines `ys` (default: random expert outputs) and compares every rank with the reference."""
    if ys is None:
        ys = [random_payload(rng, ref.recv_shape, dtype) for _ in range(group.ranks)]
    combined = group.combine(ys, out.handle)
    for s in range(group.ranks):
        want = ref.combine(s, ys, expected, dtype)[0]
        np.testing.assert_array_equal(combined[s].view(np.uint8), want.view(np.uint8), err_msg=f"rank {s}: combined")


def make_reference(rng, algorithm, layout, alignment, shape, **extra):
    ranks, experts, top_k, hidden, max_tokens = shape
    tokens = [int(rng.integers(0, max_tokens + 1)) for _ in range(ranks)]
    idx = [random_routing(rng, b, experts, top_k, extra.pop("minus_one_rate", 0.1)) for b in tokens]
    weights = [rng.random((b, top_k)).astype(np.float32) for b in tokens]
    return Reference(ranks=ranks, experts=experts, top_k=top_k, hidden=hidden, max_tokens=max_tokens,
                     algorithm=algorithm, layout=layout, alignment=alignment, idx=idx, weights=weights, **extra)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
def test_step_matches_the_reference(algorithm, layout, alignment, dtype, direction):
    rng = np.random.default_rng(hash((layout, alignment, dtype, direction)) % 2**32)
    for shape in SHAPES:
        for index_dtype in (np.int32, np.int64):
            ref = make_reference(rng, algorithm, layout, alignment, shape)
            ranks, experts, top_k, hidden, max_tokens = shape
            with ep.VirtualGroup(ranks=ranks, experts=experts, hidden=hidden, top_k=top_k, max_tokens=max_tokens,
                                 algorithm=algorithm, layout=layout, alignment=alignment, dtype=dtype) as group:
                assert group.recv_shape == ref.recv_shape
                assert group.recv_routing_shape == ref.recv_routing_shape
                out, expected, xs, idx = run_step(group, ref, rng, dtype, index_dtype=index_dtype)
                check_receive(out, expected, ranks)

                ys = [random_payload(rng, ref.recv_shape, dtype) for _ in range(ranks)]
                backward_ht = direction == "backward" and algorithm == "ht"
                grads_in = [rng.random(ref.recv_routing_shape).astype(np.float32) for _ in range(ranks)] if backward_ht else None
                result = group.combine(ys, out.handle, direction=direction, weight_gradients=grads_in)
                combined, grads = result if backward_ht else (result, None)
                for s in range(ranks):
                    want, want_grads = ref.combine(s, ys, expected, dtype, direction, grads_in)
                    assert combined[s].dtype == numpy_dtype(dtype)
                    np.testing.assert_array_equal(combined[s].view(np.uint8), want.view(np.uint8),
                                                  err_msg=f"{shape} rank {s}: combined")
                    if backward_ht:
                        np.testing.assert_array_equal(grads[s], want_grads, err_msg=f"{shape} rank {s}: weight gradients")


def test_u8_payloads_are_dispatched_byte_for_byte():
    rng = np.random.default_rng(8)
    for algorithm, layout, alignment in LAYOUTS:
        ref = make_reference(rng, algorithm, layout, alignment, (2, 8, 3, 16, 5))
        with ep.VirtualGroup(ranks=2, experts=8, hidden=16, top_k=3, max_tokens=5, algorithm=algorithm,
                             layout=layout, alignment=alignment, dtype="u8") as group:
            out, expected, _, _ = run_step(group, ref, rng, "u8")
            check_receive(out, expected, 2)


def test_ll_expert_major_combine_is_the_weighted_sum_of_expert_outputs():
    """The README's example: identity experts, so each token comes back as Σ_k w_k x."""
    group = ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32")
    xs = [np.full((1, 8), r + 1, np.float32) for r in range(2)]
    idx = [np.array([[0, 3]], np.int32)] * 2
    w = [np.array([[0.25, 0.5]], np.float32)] * 2
    out = group.dispatch(xs, idx, w)
    assert [info.expert_counters for info in out.layout] == [[2, 0], [0, 2]]
    combined = group.combine(out.tokens, out.handle)
    assert [float(c[0, 0]) for c in combined] == [0.75, 1.5]
    tokens, topk_idx, topk_weights, layout, handle = out  # unpacks like a tuple
    assert topk_idx is None and handle is out.handle


def test_empty_and_all_minus_one_routings():
    for tokens, minus_one in [([0, 0, 0], 0.0), ([4, 0, 2], 1.0), ([4, 4, 4], 0.0)]:
        for algorithm, layout, alignment in LAYOUTS:
            rng = np.random.default_rng(len(layout) + sum(tokens))
            idx = [random_routing(rng, b, 6, 2, minus_one) for b in tokens]
            weights = [rng.random((b, 2)).astype(np.float32) for b in tokens]
            ref = Reference(ranks=3, experts=6, top_k=2, hidden=8, max_tokens=4, algorithm=algorithm, layout=layout,
                            alignment=alignment, idx=idx, weights=weights)
            group = ep.VirtualGroup(ranks=3, experts=6, hidden=8, top_k=2, max_tokens=4, algorithm=algorithm,
                                    layout=layout, alignment=alignment, dtype="bf16")
            out, expected, _, _ = run_step(group, ref, rng, "bf16")
            check_receive(out, expected, 3)
            check_combine(group, ref, out, expected, "bf16", rng=rng)


@pytest.mark.parametrize("layout,alignment", [("flat", 1), ("expert_major_padded", 2)])
def test_ht_drop_policy_keeps_a_prefix_in_rank_then_token_order(layout, alignment):
    rng = np.random.default_rng(21)
    for capacity in (1, 3, 7, 12):
        ref = make_reference(rng, "ht", layout, alignment, (4, 8, 3, 8, 6), capacity=capacity, overflow="drop",
                             minus_one_rate=0.0)
        group = ep.VirtualGroup(ranks=4, experts=8, hidden=8, top_k=3, max_tokens=6, algorithm="ht", layout=layout,
                                alignment=alignment, dtype="f32", max_recv_tokens=capacity, overflow="drop")
        out, expected, _, _ = run_step(group, ref, rng, "f32")
        check_receive(out, expected, 4)
        assert sum(info.dropped_tokens for info in out.layout) > 0 or capacity == 12
        check_combine(group, ref, out, expected, "f32", rng=rng)


def test_ht_fail_policy_raises_overflow_and_names_the_rank():
    rng = np.random.default_rng(5)
    ref = make_reference(rng, "ht", "flat", 1, (2, 4, 2, 8, 6), capacity=2, minus_one_rate=0.0)
    ref.tokens = [6, 6]
    ref.idx = [random_routing(rng, 6, 4, 2, 0.0) for _ in range(2)]
    group = ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=6, algorithm="ht", dtype="f32",
                            max_recv_tokens=2)
    xs = [np.zeros((6, 8), np.float32)] * 2
    with pytest.raises(ep.ReceiveOverflowError) as caught:
        group.dispatch(xs, ref.idx, [np.ones((6, 2), np.float32)] * 2)
    rank = ref.overflowing_rank()
    assert f"overflow: rank {rank} would receive" in str(caught.value)
    assert caught.value.status_name == "epOverflow"


def test_a_masked_rank_neither_sends_nor_receives():
    rng = np.random.default_rng(9)
    for algorithm, layout, alignment in LAYOUTS:
        ref = make_reference(rng, algorithm, layout, alignment, (4, 8, 3, 8, 5), inactive={2}, minus_one_rate=0.0)
        group = ep.VirtualGroup(ranks=4, experts=8, hidden=8, top_k=3, max_tokens=5, algorithm=algorithm,
                                layout=layout, alignment=alignment, dtype="f32")
        group.deactivate(2)
        assert group.active_ranks == [0, 1, 3]
        out, expected, _, _ = run_step(group, ref, rng, "f32")
        check_receive(out, expected, 4)
        check_combine(group, ref, out, expected, "f32", rng=rng)
        group.clean()
        assert group.active_ranks == [0, 1, 2, 3]


def test_steps_repeat_on_one_group():
    rng = np.random.default_rng(3)
    group = ep.VirtualGroup(ranks=4, experts=16, hidden=16, top_k=4, max_tokens=8, dtype="bf16", layout="rank_major")
    for _ in range(5):
        ref = make_reference(rng, "ll", "rank_major", 1, (4, 16, 4, 16, 8))
        out, expected, _, _ = run_step(group, ref, rng, "bf16")
        check_receive(out, expected, 4)
        check_combine(group, ref, out, expected, "bf16", ys=out.tokens)
