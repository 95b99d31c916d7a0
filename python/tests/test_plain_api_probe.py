"""Defects a new user's probe of the plain package API found (CPU backend), each now a right
answer or a named error:

- a dispatch the library refused (bad routing) still took its turn of the buffer slots, so the
  next dispatch landed in the slot of a live step one dispatch early and overwrote its rows
  (the docs promise them until the slot is used again ``buffer_slots`` dispatches later);
"""

import numpy as np
import pytest
import torch

import expert_parallel as ep

F32 = np.float32


def group(**settings):
    values = dict(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32")
    values.update(settings)
    return ep.VirtualGroup(**values)


def inputs(offset=0.0):
    xs = [np.arange(16, dtype=F32).reshape(2, 8) + 100 * r + offset for r in range(2)]
    idx = [np.array([[0, 3], [1, 2]], np.int32)] * 2
    w = [np.array([[0.25, 0.5], [1, 2]], F32)] * 2
    return xs, idx, w


def as_kind(values, kind):
    if kind == "list":
        return list(values)
    stacked = np.stack(values)
    return stacked if kind == "numpy" else torch.from_numpy(stacked)


# -- a refused dispatch and the buffer slots -------------------------------------------------------


@pytest.mark.parametrize("kind", ["list", "numpy", "torch"])
def test_a_refused_dispatch_takes_no_buffer_slot(kind):
    g = group()
    xs, idx, w = inputs()
    first, second = g.handle(), g.handle()
    live = g.dispatch(as_kind(xs, kind), as_kind(idx, kind), as_kind(w, kind), handle=first)
    rows = np.array(live.tokens[0], copy=True)
    bad = [np.array([[0, 9], [1, 2]], np.int32)] * 2
    with pytest.raises(ep.InvalidArgumentError, match="9; must be -1 or in"):
        g.dispatch(as_kind(xs, kind), as_kind(bad, kind), as_kind(w, kind), handle=second)
    other, _, _ = inputs(offset=1000.0)
    g.dispatch(as_kind(other, kind), as_kind(idx, kind), as_kind(w, kind), handle=second)
    assert second.slot != first.slot
    np.testing.assert_array_equal(np.asarray(live.tokens[0]), rows)
    combined = g.combine(as_kind([np.asarray(t) for t in live.tokens], kind), first)
    expected = 0.25 * xs[0][0] + 0.5 * xs[0][0]
    np.testing.assert_allclose(np.asarray(combined[0][0]), expected, rtol=1e-6)
