"""Attacks on the torch ops' lean calls into a VirtualGroup (VirtualGroup._dispatch_fresh /
_combine_fresh trust the ops' checks and write raw addresses into the C call) and on what came
with them (the registry's per-group shapes, the step token's weakref, a dropped Exchange that
unregisters). Inputs that must reach the library only checked: Dispatched fields of other steps
or other exchanges, direct op calls with other steps' tensors, wrong ``tokens=``, wrong gradient
shapes; and an Exchange's shallow copy, which shares its registration."""

import copy
import gc

import pytest
import torch

import expert_parallel as ep
from expert_parallel.torch import Exchange
from test_torch_autograd import LAYOUTS, exchange
from torch_moe import routing

R, E, K, H, B = 4, 16, 3, 8, 5
OPS = torch.ops.expert_parallel


def step(ex, inputs):
    x, idx, w, _ = inputs
    sent = ex.dispatch(x, idx, w)
    return sent, ex.combine(sent.tokens * 1, sent)


def test_a_shallow_copy_of_an_exchange_stays_registered_once_the_original_is_dropped():
    """copy.copy(exchange) shares the exchange's id (the registry's entry): dropping the original
    unregistered it (its weakref.finalize watched the original object only), and the copy, still
    in use, then failed with "exchange N is closed" (or "id N is not registered"), though nobody
    closed it.
    The registration lives as long as any copy does; close() on either closes it."""
    original = exchange("ll", "rank_major")
    inputs = routing(31, R, B, E, K, H)
    _, want = step(original, inputs)
    copied = copy.copy(original)
    del original
    gc.collect()
    _, got = step(copied, inputs)
    assert torch.equal(got, want)
    ident = copied.id
    alias = copy.copy(copied)
    alias.close()   # (closes the shared registration)
    with pytest.raises(ep.InvalidUsageError, match=f"exchange {ident} is closed"):
        step(copied, inputs)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_direct_op_calls_with_another_steps_tensors_are_named(algorithm, layout):
    """The ops' calls with a step token of one B and tensors of another (routing, weights, the
    backward ops' gradients and tokens=): named by the op, never reaching the library."""
    ex = exchange(algorithm, layout)
    x, idx, w, _ = routing(32, R, B, E, K, H)
    x3, idx3, w3, _ = routing(33, R, 3, E, K, H)
    five, three = ex.dispatch(x, idx, w), ex.dispatch(x3, idx3, w3)
    weights = five.weights if layout == "expert_major" else five.topk_weights if layout == "expert_major_padded" else None
    with pytest.raises(ep.InvalidArgumentError, match="dispatched.routing"):
        OPS.combine(five.tokens, idx, weights, three.step, ex.id)
    with pytest.raises(ep.InvalidArgumentError, match=r"grad_combined: shape \[4, 5, 8\]; must be \[4, 3, 8\]"):
        OPS.backward_dispatch(x, three.step, ex.id)
    with pytest.raises(ep.InvalidArgumentError, match="tokens=5; must be 3"):
        OPS.backward_combine(five.tokens, five.topk_weights, three.step, ex.id, 5)
    with pytest.raises(ep.InvalidArgumentError, match="grad_received: shape"):
        OPS.backward_combine(five.tokens[:, :1], None, three.step, ex.id, 3)
    if algorithm == "ht":
        with pytest.raises(ep.InvalidArgumentError, match="grad_weights: shape"):
            OPS.backward_combine(five.tokens, five.topk_weights[:, :1], three.step, ex.id, 3)
    other = exchange(algorithm, layout)
    with pytest.raises(ep.InvalidUsageError, match=f"not of exchange {other.id}"):
        OPS.backward_dispatch(x, five.step, other.id)
