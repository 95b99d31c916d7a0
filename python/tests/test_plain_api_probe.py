"""Defects a new user's probe of the plain package API found (CPU backend), each now a right
answer or a named error:

- a dispatch the library refused (bad routing) still took its turn of the buffer slots, so the
  next dispatch landed in the slot of a live step one dispatch early and overwrote its rows
  (the docs promise them until the slot is used again ``buffer_slots`` dispatches later);
- a combine whose expert outputs were of the other kind than its dispatch's (torch CPU tensors
  after NumPy arrays, or the reverse) replaced the step's buffer slot with fresh buffers: an HT
  expert-major padded step then lost its per-slot weights (its combine, and every later one,
  raised InvalidUsageError saying a later dispatch had used the slot), and the slot's use count
  started again, so a stale handle could pass the check of a slot used since;
- a refused dispatch of the other kind of array than the slot's still replaced the slot it
  would have used (the oldest live step's) with fresh buffers before the library refused it:
  an HT expert-major padded step in that slot then lost its per-slot weights, and its combine
  raised InvalidUsageError saying a later dispatch had used the slot.
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
    rows = np.asarray(live.tokens[0]).copy()
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


# -- a combine of the other kind of array ----------------------------------------------------------


def _padded_step(dispatch_kind):
    g = group(algorithm="ht", layout="expert_major_padded", alignment=2, max_tokens=2)
    xs, idx, w = inputs()
    h = g.handle()
    out = g.dispatch(as_kind(xs, dispatch_kind), as_kind(idx, dispatch_kind), as_kind(w, dispatch_kind), handle=h)
    rows = [np.asarray(t).copy() for t in out.tokens]
    return g, h, rows


def _expected(rows, g, h):
    """The combine of `rows` (the dispatch's own received rows, weighted by the per-slot weights)."""
    reference = group(algorithm="ht", layout="expert_major_padded", alignment=2, max_tokens=2)
    xs, idx, w = inputs()
    step = reference.dispatch(xs, idx, w)
    return [np.asarray(y).copy() for y in reference.combine(rows, step.handle)]


@pytest.mark.parametrize("dispatch_kind, combine_kind", [("numpy", "torch"), ("torch", "numpy"), ("list", "torch")])
@pytest.mark.parametrize("stacked", [True, False])
def test_a_padded_combine_of_the_other_kind_keeps_the_step(dispatch_kind, combine_kind, stacked):
    g, h, rows = _padded_step(dispatch_kind)
    expected = _expected(rows, g, h)
    other = torch.from_numpy(np.stack(rows)) if combine_kind == "torch" else np.stack(rows)
    combined = g.combine(other if stacked else list(other), h)
    for r in range(2):
        np.testing.assert_array_equal(np.asarray(combined[r]), expected[r])
    # The step is still whole: a combine of the dispatch's own kind after it.
    same = as_kind(rows, dispatch_kind)
    again = g.combine(same, h)
    for r in range(2):
        np.testing.assert_array_equal(np.asarray(again[r]), expected[r])


def test_a_stale_handle_is_named_after_its_slot_took_a_dispatch_of_the_other_kind():
    g = group(algorithm="ht", layout="expert_major_padded", alignment=2, max_tokens=2)
    xs, idx, w = inputs()
    first, second, third = g.handle(), g.handle(), g.handle()
    out = g.dispatch(np.stack(xs), np.stack(idx), np.stack(w), handle=first)
    rows = np.stack([np.asarray(t).copy() for t in out.tokens])
    g.combine(torch.from_numpy(rows), first)           # (a combine of the other kind: no dispatch)
    g.dispatch(np.stack(xs), np.stack(idx), np.stack(w), handle=second)
    g.dispatch(torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(idx)), torch.from_numpy(np.stack(w) * 10),
               handle=third)                          # slot 0 again, as torch tensors
    for expert_outputs in (rows, torch.from_numpy(rows), list(rows)):
        with pytest.raises(ep.InvalidUsageError, match="buffer slot 0, which a later dispatch has used since"):
            g.combine(expert_outputs, first)
    # and the step that holds the slot now is intact
    y = g.combine(torch.from_numpy(np.stack([np.asarray(t).copy() for t in g.dispatch(
        torch.from_numpy(np.stack(xs)), None, torch.from_numpy(np.stack(w) * 10), handle=third).tokens])), third)
    assert np.isfinite(np.asarray(y[0])).all()


# -- a refused dispatch of the other kind of array -------------------------------------------------


@pytest.mark.parametrize("refused_kind", ["torch", "torch list", "numpy", "list"])
def test_a_refused_dispatch_of_the_other_kind_leaves_the_live_step_in_its_slot(refused_kind):
    dispatch_kind = "numpy" if refused_kind.startswith("torch") else "torch"
    g, first, rows = _padded_step(dispatch_kind)
    expected = _expected(rows, g, first)
    xs, idx, w = inputs()
    g.dispatch(as_kind(xs, dispatch_kind), as_kind(idx, dispatch_kind), as_kind(w, dispatch_kind), handle=g.handle())
    assert g.buffer_slots == 2   # the next dispatch lands in slot 0: first's, still live
    bad = [np.array([[0, 9], [1, 2]], np.int32)] * 2
    kind = {"torch list": "list", "list": "list"}.get(refused_kind, refused_kind)
    convert = (lambda v: [torch.from_numpy(a) for a in v]) if refused_kind == "torch list" else (lambda v: as_kind(v, kind))
    with pytest.raises(ep.InvalidArgumentError, match="9; must be -1 or in"):
        g.dispatch(convert(xs), convert(bad), convert(w), handle=g.handle())
    combined = g.combine(as_kind(rows, dispatch_kind), first)
    for r in range(2):
        np.testing.assert_array_equal(np.asarray(combined[r]), expected[r])
