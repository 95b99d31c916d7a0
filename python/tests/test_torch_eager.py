"""Exchange's eager calls run the ops' implementations without the dispatcher (torch/_eager.py),
and give what the ops give: the same outputs and gradients, bit for bit, in every layout. Whatever
intercepts calls (a dispatch or function mode, the profiler, torch.compile) still sees the ops."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from expert_parallel.torch import _autograd, _ops
from test_torch_autograd import LAYOUTS, exchange, run
from torch_moe import over_group, routing

R, E, K, H, B = 4, 16, 3, 8, 5


class Counted:
    """Counts the calls of the op functions _autograd calls (module attributes of _ops)."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("dispatch", "combine", "backward_dispatch", "backward_combine"):
            op = getattr(_ops, name)
            monkeypatch.setattr(_ops, name, self._wrap(name, op))

    def _wrap(self, name, op):
        def counted(*args):
            self.calls.append(name)
            return op(*args)
        return counted


class Seen(TorchDispatchMode):
    """A dispatch mode that records the ops it sees (and changes nothing)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


class Passing(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_eager_calls_and_backward_take_no_op(monkeypatch, algorithm, layout):
    counted = Counted(monkeypatch)
    ex = exchange(algorithm, layout)
    got = run(lambda *a: over_group(ex, *a), routing(1, R, B, E, K, H))
    assert counted.calls == [] and got[1].abs().sum() > 0
    with torch.no_grad():
        x, idx, w, _ = routing(2, R, B, E, K, H)
        sent = ex.dispatch(x, idx, w)
        ex.combine(sent.tokens, sent)
    assert counted.calls == []


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
@pytest.mark.parametrize("mode", [Seen, Passing])
def test_under_a_mode_the_ops_run_and_give_the_same_bits(monkeypatch, algorithm, layout, mode):
    ex = exchange(algorithm, layout)
    inputs = routing(3, R, B, E, K, H)
    eager = run(lambda *a: over_group(ex, *a), inputs)
    counted = Counted(monkeypatch)
    active = mode()
    with active:
        through_ops = run(lambda *a: over_group(ex, *a), inputs)
    # (a function mode is not active in the autograd engine's backward calls: they need not be the ops there)
    wanted = {"dispatch", "combine"} | ({"backward_dispatch", "backward_combine"} if mode is Seen else set())
    assert wanted <= set(counted.calls)
    if mode is Seen:
        assert {"expert_parallel.dispatch.default", "expert_parallel.combine.default"} <= active.ops
    for name, a, b in zip(("combined", "grad x", "grad topk_weights", "grad experts"), eager, through_ops):
        assert torch.equal(a, b), f"{layout}: {name} differs between the eager call and the op"


def test_inference_outputs_equal_the_ops(monkeypatch):
    ex = exchange("ll", "rank_major")
    x, idx, w, _ = routing(4, R, B, E, K, H)
    with torch.no_grad():
        sent = ex.dispatch(x, idx, w)
        y = ex.combine(sent.tokens * 2, sent)
        with Passing():
            sent_op = ex.dispatch(x, idx, w)
            y_op = ex.combine(sent_op.tokens * 2, sent_op)
    for a, b in ((sent.tokens, sent_op.tokens), (sent.topk_idx, sent_op.topk_idx), (sent.topk_weights, sent_op.topk_weights),
                 (sent.expert_counts, sent_op.expert_counts), (y, y_op)):
        assert torch.equal(a, b)
    assert not y.requires_grad and y.abs().sum() > 0


def test_the_profiler_sees_the_ops():
    ex = exchange("ll", "expert_major")
    x, idx, w, _ = routing(5, R, B, E, K, H)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        sent = ex.dispatch(x, idx, w)
        ex.combine(sent.tokens, sent)
    names = {event.name for event in profile.events()}
    assert {"expert_parallel::dispatch", "expert_parallel::combine"} <= names


def test_create_graph_backward_goes_through_the_ops(monkeypatch):
    """Under create_graph=True the backward calls are the ops (their missing derivative is what
    autograd must meet), not the implementations."""
    ex = exchange("ht", "flat")
    x, idx, w, _ = routing(6, R, B, E, K, H)
    x.requires_grad_()
    sent = ex.dispatch(x, idx, w)
    y = ex.combine(sent.tokens * 3, sent)
    counted = Counted(monkeypatch)
    try:
        torch.autograd.grad(y.sum(), x, create_graph=True)
    except RuntimeError:
        pass   # (whether torch then refuses the op without a derivative is torch's; the op was called)
    assert "backward_combine" in counted.calls


def test_eager_decision_is_cheap_and_plain():
    from expert_parallel.torch import _eager
    t = torch.zeros(2)
    assert _eager.direct(t, t, None, t)
    assert not _eager.direct(torch.zeros(2, device="meta"))
    with Passing():
        assert not _eager.direct(t)
    with Seen():
        assert not _eager.direct(t)

    class Sub(torch.Tensor):
        pass
    assert not _eager.direct(t.as_subclass(Sub))
    assert _autograd.EagerDispatch is not None


@pytest.mark.parametrize("algorithm,layout", [("ll", "expert_major"), ("ht", "flat")])
@pytest.mark.parametrize("mode", [None, Seen])
def test_a_gradient_of_a_gradient_through_the_backward_ops_is_refused_not_zero(algorithm, layout, mode):
    """The backward ops have no derivative: differentiating the gradient a create_graph=True
    backward pass gave (which ran them) raises, as the custom_op-defined ops did; without an
    Autograd kernel torch's fallback let it through with a zero gradient."""
    ex = exchange(algorithm, layout)
    x, idx, w, _ = routing(9, R, B, E, K, H)
    x.requires_grad_()
    with mode() if mode else torch.enable_grad():
        sent = ex.dispatch(x, idx, w)
        y = ex.combine(sent.tokens * 3, sent)
        gx, = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
        assert gx.requires_grad
        with pytest.raises(RuntimeError, match=r"expert_parallel\.backward_(combine|dispatch)"):
            torch.autograd.grad(gx.sum(), x)


def test_the_ops_modules_can_be_reloaded():
    """importlib.reload (IPython's autoreload) of the ops' modules redefines the ops, as it did
    with custom_op: a second torch.library.Library(..., "DEF") of the namespace raised."""
    import os
    import subprocess
    import sys

    script = """
import importlib
import torch
import expert_parallel as ep
from expert_parallel.torch import Exchange, _autograd, _ops
from torch.overrides import TorchFunctionMode
class Passing(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
importlib.reload(_ops)   # alone: the ops' derivatives are registered again (a function mode makes the calls the ops')
ex = Exchange(ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32", algorithm="ht", layout="flat"))
x = torch.randn(2, 3, 8, requires_grad=True)
idx = torch.tensor([[[0, 1], [2, 3], [1, 2]], [[3, 0], [1, 3], [0, 2]]])
with Passing():
    sent = ex.dispatch(x, idx, torch.rand(2, 3, 2))
    ex.combine(sent.tokens * 2, sent).sum().backward()
assert x.grad is not None and x.grad.abs().sum() > 0
importlib.reload(_autograd)
ex = Exchange(ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32", algorithm="ht", layout="flat"))
x = torch.randn(2, 3, 8, requires_grad=True)
idx = torch.tensor([[[0, 1], [2, 3], [1, 2]], [[3, 0], [1, 3], [0, 2]]])
sent = ex.dispatch(x, idx, torch.rand(2, 3, 2))
ex.combine(sent.tokens * 2, sent).sum().backward()
assert x.grad.abs().sum() > 0
def step(x):
    sent = ex.dispatch(x, idx, torch.ones(2, 3, 2))
    return ex.combine(sent.tokens, sent)
assert torch.equal(torch.compile(step, backend="aot_eager", fullgraph=True)(x.detach()), step(x.detach()))
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_under_functionalization_the_ops_run():
    """torch._enable_functionalization (C++ functionalization: the tensors are FunctionalTensorWrappers,
    plain torch.Tensors to Python, without storage) is something that intercepts calls: the ops
    run (its fallback unwraps them); the implementations read a null address."""
    ex = exchange("ht", "flat")
    x, idx, w, _ = routing(10, R, B, E, K, H)

    def moe(x, idx, w):
        sent = ex.dispatch(x, idx, w)
        return ex.combine(sent.tokens * 2, sent)

    want = moe(x, idx, w)
    wrapped = [torch._to_functional_tensor(t) for t in (x, idx, w)]
    torch._enable_functionalization(reapply_views=True)
    try:
        got = moe(*wrapped)
    finally:
        torch._disable_functionalization()
    assert torch.equal(torch._from_functional_tensor(got), want)


def test_a_dispatch_op_call_without_the_weights_a_layout_carries_is_named():
    """torch.ops.expert_parallel.dispatch takes topk_weights=None (LL expert-major's); for a layout
    that sends them with the rows the group's own check names it (VirtualGroup._dispatch_fresh
    left it to the library's 'epGroupDispatchStacked: ... topk_weights = NULL')."""
    import expert_parallel as ep

    for layout_of in (("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")):
        ex = exchange(*layout_of)
        x, idx, w, _ = routing(11, R, B, E, K, H)
        with pytest.raises(ep.InvalidArgumentError, match=rf"^topk_weights: None; layout '{layout_of[1]}' sends the weights"):
            torch.ops.expert_parallel.dispatch(x, idx, None, ex.id)
        sent = ex.dispatch(x, idx, w)   # (the failed call left the group as it was)
        assert ex.combine(sent.tokens, sent).abs().sum() > 0


def test_the_eager_calls_make_no_routing_placeholders():
    """Where the layout receives no routing (LL expert-major) the ops' schema returns ``[R, 0]``
    placeholders (dispatch's received routing, the LL backward combine's weight gradients); the
    eager calls, whose callers drop them, make none (two fewer tensors a dispatch), and the rest is
    the op's."""
    ex = exchange("ll", "expert_major")
    x, idx, w, _ = routing(12, R, B, E, K, H)
    eager = _ops.run_dispatch(x, idx, None, ex.id, False)
    op = torch.ops.expert_parallel.dispatch(x, idx, None, ex.id)
    assert eager[1] is None and eager[2] is None and op[1].shape == op[2].shape == (R, 0)
    assert torch.equal(eager[0], op[0]) and torch.equal(eager[4], op[4])
    grad_received = torch.randn(op[0].shape)
    grads = _ops.run_backward_combine(grad_received, None, eager[3], ex.id, B, False)
    assert grads[1] is None and torch.equal(grads[0], _ops.backward_combine(grad_received, None, eager[3], ex.id, B)[0])
    x.requires_grad_()
    sent = ex.dispatch(x, idx, w)   # (autograd's Function: None outputs there too)
    assert sent.topk_idx is None and sent.tokens.grad_fn is not None
    ex.combine(sent.tokens, sent).sum().backward()
    assert x.grad.abs().sum() > 0


def test_a_dead_functorch_wrapper_is_unwrapped_as_function_apply_unwraps_it():
    """The eager Function is applied without Function.apply's Python wrapper (_autograd), whose
    one step these calls need is kept: a functorch wrapper left over from a finished transform is
    unwrapped, and the call gives what the tensor it wraps gives."""
    ex = exchange("ht", "flat")
    x, idx, w, _ = routing(13, R, B, E, K, H)
    leaked = []
    torch.func.grad(lambda t: (leaked.append(t), t.sum())[1])(x)
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead) and dead.requires_grad
    sent = ex.dispatch(dead, idx, w)
    want = ex.dispatch(x, idx, w)
    assert torch.equal(sent.tokens, want.tokens)
    y = ex.combine(sent.tokens * 2, sent)
    assert torch.equal(y, ex.combine(want.tokens * 2, want))
