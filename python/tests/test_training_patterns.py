"""expert_parallel.torch under the patterns training loops use, on the CPU backend, every gradient
compared with the dense single-device MoE (torch_moe.py): activation checkpointing (reentrant and
not), pipeline schedules with more micro-batches in flight than the group's buffer slots (backward
passes in order and out of it, and other micro-batches' exchanges run inside a backward pass),
gradient accumulation, retain_graph, outputs used twice or not at all, gradients asked of some
inputs only, no_grad / inference_mode steps between training steps, routing that changes every
step (short, empty and -1 micro-batches, HT's dropped selections), torch.compile training steps
with an optimizer, and steps that end without a backward pass (dropped outputs, errors mid-step):
their handles go back to the pool with nothing of their graphs."""

import gc
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import expert_parallel as ep
from expert_parallel.torch import Exchange, _registry
from test_torch_autograd import B, E, H, K, LAYOUTS, R, exchange
from torch_moe import dense, expert_coefficients, over_group, routing


def leaves(inputs):
    return [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]


def probe(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_grads(got, want, what, tolerance=1e-5):
    """x, topk_weights and the experts' gradients of `got` (leaves) equal `want`'s (dense leaves)."""
    for name, j in (("x", 0), ("topk_weights", 2), ("experts", 3)):
        a, b = got[j].grad, want[j].grad
        assert a is not None and b is not None, f"{what}: no gradient of {name}"
        error = (a - b).abs().max().item()
        assert error <= tolerance * max(1.0, b.abs().max().item()), f"{what}: {name} gradient differs by {error}"


def dense_grads(inputs, scale=1.0, seed=1):
    d = leaves(inputs)
    (dense(*d) * probe((R, inputs[0].shape[1], H), seed) * scale).sum().backward()
    return d


def experts(ex, sent, maps):
    """torch_moe's linear experts on the received rows (over_group's middle)."""
    rows = sent.tokens.reshape(R, -1, H)
    outputs = torch.einsum("rnh,rlhk->rnlk", rows, maps.reshape(R, E // R, H, H))
    return (outputs * expert_coefficients(ex, sent).unsqueeze(-1)).sum(2).reshape(sent.tokens.shape)


def live(ex):
    gc.collect()
    return dict(_registry.entry(ex.id).live)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_activation_checkpointing_gives_the_dense_gradients_and_ends_its_steps(algorithm, layout, reentrant):
    """The forward runs again in the backward pass (a new step); every step ends with the graph.
    (Non-reentrant checkpointing's first forward never runs its backward: its step stayed live
    for good in the layouts that receive weights, with the graph upstream of it.)"""
    ex = exchange(algorithm, layout)
    for seed in range(2):
        inputs = routing(100 + seed, R, B, E, K, H)
        a = leaves(inputs)
        upstream = torch.ones((), requires_grad=True)   # a layer before the block
        y = checkpoint(over_group, ex, a[0] * upstream, *a[1:], use_reentrant=reentrant)
        (y * probe(y.shape)).sum().backward()
        assert_grads(a, dense_grads(inputs), f"{layout} reentrant={reentrant}")
        kept = weakref.ref(upstream)
        del y, a, upstream
        assert not live(ex) and kept() is None


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 1, 0, 2)])
@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_more_micro_batches_in_flight_than_buffer_slots(algorithm, layout, order):
    """Four micro-batches dispatched before the first combine, all combined before the first
    backward pass (buffer_slots=1), then the backward passes in `order`."""
    ex = exchange(algorithm, layout, buffer_slots=1)
    batches = [routing(110 + i, R, B, E, K, H) for i in range(4)]
    args = [leaves(inputs) for inputs in batches]
    sent = [ex.dispatch(a[0], a[1], a[2]) for a in args]
    ys = [ex.combine(experts(ex, s, a[3]), s) for s, a in zip(sent, args)]
    del sent
    assert len(live(ex)) == 4
    for i in order:
        (ys[i] * probe(ys[i].shape, i)).sum().backward()
        assert_grads(args[i], dense_grads(batches[i], seed=i), f"{layout} micro-batch {i}")
    del ys
    assert not live(ex)


class OtherMicroBatches(torch.autograd.Function):
    """The identity, whose backward pass runs three other micro-batches' forward passes and one's
    backward pass (as schedules that overlap one micro-batch's backward with another's forward do)."""

    @staticmethod
    def forward(ctx, rows, ex, batches):
        ctx.ex, ctx.batches = ex, batches
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            ys = [over_group(ctx.ex, *leaves(inputs)) for inputs in ctx.batches]
            ys[0].sum().backward()
        return grad, None, None


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_other_micro_batches_exchanges_inside_a_backward_pass(algorithm, layout):
    ex = exchange(algorithm, layout, buffer_slots=1)
    inputs = routing(120, R, B, E, K, H)
    others = [routing(121 + i, R, B, E, K, H) for i in range(3)]
    a = leaves(inputs)
    sent = ex.dispatch(a[0], a[1], a[2])
    y = ex.combine(experts(ex, sent._replace(tokens=OtherMicroBatches.apply(sent.tokens, ex, others)), a[3]), sent)
    (y * probe(y.shape)).sum().backward()
    assert_grads(a, dense_grads(inputs), layout)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_accumulation_retain_graph_and_outputs_used_twice_or_not_at_all(algorithm, layout):
    ex = exchange(algorithm, layout)
    inputs = routing(130, R, B, E, K, H)
    # retain_graph=True and a second backward pass: twice the gradients
    a = leaves(inputs)
    y = over_group(ex, *a)
    for _ in range(2):
        (y * probe(y.shape)).sum().backward(retain_graph=True)
    assert_grads(a, dense_grads(inputs, scale=2.0), f"{layout} retain_graph")
    # an output used twice, and one step's rows combined twice
    a = leaves(inputs)
    y = over_group(ex, *a)
    (y * probe(y.shape) + y * probe(y.shape) * 2).sum().backward()
    assert_grads(a, dense_grads(inputs, scale=3.0), f"{layout} output used twice")
    a = leaves(inputs)
    sent = ex.dispatch(a[0], a[1], a[2])
    y = ex.combine(experts(ex, sent, a[3]), sent) + ex.combine(experts(ex, sent, a[3]) * 2, sent)
    (y * probe(y.shape)).sum().backward()
    assert_grads(a, dense_grads(inputs, scale=3.0), f"{layout} combined twice")
    # a micro-batch left without a backward pass beside one with it
    a, unused = leaves(inputs), leaves(routing(131, R, B, E, K, H))
    y, dropped = over_group(ex, *a), over_group(ex, *unused)
    (y * probe(y.shape)).sum().backward()
    assert_grads(a, dense_grads(inputs), f"{layout} beside an unused output")
    del y, dropped, sent
    assert not live(ex)
    # the experts' gradients accumulated over micro-batches of new routing each
    maps, reference = inputs[3].clone().requires_grad_(), inputs[3].clone().requires_grad_()
    for step in range(3):
        x, idx, w, _ = routing(140 + step, R, B, E, K, H)
        over_group(ex, x, idx, w, maps).square().sum().backward()
        dense(x, idx, w, reference).square().sum().backward()
    assert torch.allclose(maps.grad, reference.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_gradients_of_some_inputs_and_no_grad_steps_between_training_steps(algorithm, layout):
    ex = exchange(algorithm, layout)
    inputs = routing(150, R, B, E, K, H)
    want = dense_grads(inputs)
    for mask in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1)):
        a = [t.clone() for t in inputs]
        for j, wanted in zip((0, 2, 3), mask):
            a[j].requires_grad_(bool(wanted))
        (over_group(ex, *a) * probe((R, B, H))).sum().backward()
        for j, wanted in zip((0, 2, 3), mask):
            if wanted:
                assert torch.allclose(a[j].grad, want[j].grad, atol=1e-5, rtol=1e-5), f"{layout} {mask}: input {j}"
            else:
                assert a[j].grad is None
    for step in range(2):
        with torch.no_grad():
            evaluated = over_group(ex, *inputs)
        with torch.inference_mode():
            inferred = over_group(ex, *inputs)
        assert torch.equal(evaluated, inferred) and torch.allclose(evaluated, dense(*inputs), atol=1e-5)
        a = leaves(inputs)
        (over_group(ex, *a) * probe((R, B, H))).sum().backward()
        assert_grads(a, want, f"{layout} after no_grad steps")
    assert not live(ex)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_routing_that_changes_every_step_short_and_empty_micro_batches(algorithm, layout):
    ex = exchange(algorithm, layout)
    g = torch.Generator().manual_seed(4)
    for step, tokens in enumerate((5, 1, 0, 3, 5, 2)):
        if tokens:
            inputs = list(routing(160 + step, R, tokens, E, K, H))
        else:   # (routing() stacks no rows)
            inputs = [torch.zeros(R, 0, H), torch.zeros(R, 0, K, dtype=torch.int64), torch.zeros(R, 0, K), routing(160, R, 1, E, K, H)[3]]
        idx = inputs[1]
        if step == 3:
            idx[1] = -1            # a rank sends nothing
            idx[:, 0] = -1         # a token goes nowhere
        if step == 4:              # experts of ranks 2 and 3 get nothing
            idx = torch.stack([torch.randperm(E // 2, generator=g)[:K] for _ in range(R * tokens)]).reshape(R, tokens, K)
        inputs[1] = idx
        a = leaves(inputs)
        y = over_group(ex, *a)
        (y * probe(y.shape)).sum().backward()
        if tokens:
            assert torch.allclose(y, dense(*inputs), atol=1e-5)
            assert_grads(a, dense_grads(inputs), f"{layout} step {step}")
        else:
            assert y.shape == (R, 0, H) and a[0].grad.shape == (R, 0, H)
    del y, a
    assert not live(ex)


@pytest.mark.parametrize("layout", ["flat", "expert_major_padded"])
def test_dropped_selections_pass_gradcheck(layout):
    ex = exchange("ht", layout, overflow="drop", max_recv_tokens=4)
    x, idx, w, maps = routing(170, R, 3, E, K, H)
    assert not torch.allclose(over_group(ex, x, idx, w, maps), dense(x, idx, w, maps), atol=1e-4)   # some dropped
    fn = lambda x, w, maps: over_group(ex, x, idx, w, maps)  # noqa: E731
    with pytest.warns(UserWarning, match="not a double precision"):
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_(), maps.requires_grad_()),
                                        eps=1e-3, atol=1e-2, rtol=1e-2, fast_mode=True)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_a_step_without_a_backward_pass_ends_and_keeps_no_graph(algorithm, layout):
    """A step whose backward pass never runs (its output dropped, a combine refused, an error
    between dispatch and combine) ends when its outputs go, and a pooled handle keeps nothing of
    the graph behind the routing weights. (The handle kept the received weights, the dispatch's
    output: a cycle through the registry that kept such a step, and everything its graph saved,
    for good, in the layouts that receive weights.)"""
    ex = exchange(algorithm, layout)
    inputs = routing(180, R, B, E, K, H)
    upstream = torch.ones((), requires_grad=True)
    kept = weakref.ref(upstream)
    a = leaves(inputs)
    a[2] = a[2] * upstream
    y = over_group(ex, *a)                        # evaluated with gradients on, never backpropagated
    sent = ex.dispatch(a[0], a[1], a[2])
    with pytest.raises(ep.InvalidArgumentError, match="expert_outputs: shape"):
        ex.combine(sent.tokens[..., :2], sent)
    try:
        sent = ex.dispatch(a[0], a[1], a[2])
        raise RuntimeError("an error in the experts")
    except RuntimeError:
        pass
    del y, sent, a, upstream
    assert not live(ex) and kept() is None
    a = leaves(inputs)                            # and then a training step as usual
    (over_group(ex, *a) * probe((R, B, H))).sum().backward()
    assert_grads(a, dense_grads(inputs), f"{layout} after dropped steps")
    # the same once a backward pass ran: the pooled handle keeps nothing upstream
    upstream = torch.ones((), requires_grad=True)
    kept = weakref.ref(upstream)
    a = leaves(inputs)
    over_group(ex, a[0], a[1], a[2] * upstream, a[3]).sum().backward()
    del a, upstream
    assert not live(ex) and kept() is None


def test_compiled_forward_without_backward_across_a_graph_break_ends_its_step():
    """A graph break between dispatch and combine (a grouped GEMM reading the counts on the host)
    makes the dispatch's outputs a compiled graph's outputs: the same cycle as eager mode."""
    torch._dynamo.reset()
    ex = exchange("ht", "flat")

    def block(x, idx, w, maps):
        sent = ex.dispatch(x, idx, w)
        sent.expert_counts.tolist()               # a graph break
        return ex.combine(experts(ex, sent, maps), sent)

    compiled = torch.compile(block, backend="aot_eager")
    inputs = routing(190, R, B, E, K, H)
    compiled(*leaves(inputs))
    assert not live(ex)
    a = leaves(inputs)
    (compiled(*a) * probe((R, B, H))).sum().backward()
    assert_grads(a, dense_grads(inputs), "compiled across a graph break")


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_compiled_training_steps_equal_eager_and_the_dense_block(algorithm, layout):
    """Three optimizer steps of a compiled MoE (fullgraph; aot_eager: bit for bit with eager mode),
    token counts changing, beside the same steps run eagerly; the gradients within 1e-5 of the
    dense MoE. (Without fullgraph, across a graph break: the test above.)"""
    torch._dynamo.reset()
    ex = exchange(algorithm, layout)
    compiled_maps = torch.nn.Parameter(routing(200, R, B, E, K, H)[3])
    eager_maps = torch.nn.Parameter(compiled_maps.detach().clone())
    compiled = torch.compile(lambda x, idx, w: over_group(ex, x, idx, w, compiled_maps), fullgraph=True, backend="aot_eager")
    optimizers = [torch.optim.SGD([p], lr=0.05) for p in (compiled_maps, eager_maps)]
    for step, tokens in enumerate((5, 3, 5)):
        x, idx, w, _ = routing(201 + step, R, tokens, E, K, H)
        losses = []
        for run, maps, optimizer in ((compiled, compiled_maps, optimizers[0]),
                                     (lambda *a: over_group(ex, *a, eager_maps), eager_maps, optimizers[1])):
            optimizer.zero_grad()
            loss = run(x, idx, w).square().mean()
            loss.backward()
            losses.append(loss.detach())
        reference = eager_maps.detach().clone().requires_grad_()
        dense(x, idx, w, reference).square().mean().backward()
        assert torch.equal(losses[0], losses[1]) and torch.equal(compiled_maps.grad, eager_maps.grad), f"{layout} step {step}"
        assert torch.allclose(eager_maps.grad, reference.grad, atol=1e-6, rtol=1e-5), f"{layout} step {step}"
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(compiled_maps, eager_maps)


# Over an NCCLGroup (one rank of a torchrun job), run here on one CPU rank (test_torch_nccl_rank.py).

from test_torch_nccl_rank import CASES, experts as rank_experts, inputs as rank_inputs, rank_group, settings_of  # noqa: E402,F401


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 1, 0, 2)])
@pytest.mark.parametrize("algorithm,layout,weights_grad", CASES)
def test_an_nccl_rank_with_more_micro_batches_in_flight_than_buffer_slots(rank_group, algorithm, layout, weights_grad, order):
    """Four micro-batches' forward passes (each combined before the next dispatch) through two
    buffer slots, then their backward passes in `order`: the gradients of a VirtualGroup of one rank."""
    settings = settings_of(algorithm, layout, "f32")
    on_rank = Exchange(rank_group(**settings))
    on_reference = Exchange(ep.VirtualGroup(ranks=1, device="cpu", **settings))
    ys, args = [], []
    for batch in range(4):
        x, idx, w = rank_inputs(6, 8, 32, 3, torch.float32, batch)
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_(weights_grad)
        xb, wb = x[None].clone().requires_grad_(), w[None].clone().requires_grad_(weights_grad)
        sa, sb = on_rank.dispatch(xa, idx, wa), on_reference.dispatch(xb, idx[None], wb)
        ys.append((on_rank.combine(rank_experts(sa, layout), sa), on_reference.combine(rank_experts(sb, layout), sb)))
        args.append((xa, wa, xb, wb))
    for i in order:
        ys[i][0].square().sum().backward()
        ys[i][1].square().sum().backward()
        xa, wa, xb, wb = args[i]
        assert torch.equal(xa.grad, xb.grad[0]) and (not weights_grad or torch.equal(wa.grad, wb.grad[0]))


@pytest.mark.parametrize("algorithm,layout,weights_grad", [
    ("ht", "flat", True),
    ("ht", "expert_major_padded", True),
    ("ll", "rank_major", False)])
def test_an_nccl_ranks_step_without_a_backward_pass_ends(rank_group, algorithm, layout, weights_grad):
    exchange_ = Exchange(rank_group(**settings_of(algorithm, layout, "f32")))
    x, idx, w = rank_inputs(6, 8, 32, 3, torch.float32, 0)
    sent = exchange_.dispatch(x.clone().requires_grad_(), idx, w.clone().requires_grad_(weights_grad))
    y = exchange_.combine(rank_experts(sent, layout), sent)
    del y, sent
    assert not live(exchange_)


@pytest.mark.parametrize("algorithm,layout", [
    ("ht", "flat"), ("ht", "expert_major_padded")])
def test_an_nccl_ranks_pooled_handle_keeps_no_graph(rank_group, algorithm, layout):
    exchange_ = Exchange(rank_group(**settings_of(algorithm, layout, "f32")))
    x, idx, w = rank_inputs(6, 8, 32, 3, torch.float32, 0)
    upstream = torch.ones((), requires_grad=True)
    kept = weakref.ref(upstream)
    sent = exchange_.dispatch(x.clone().requires_grad_(), idx, w * upstream)
    exchange_.combine(rank_experts(sent, layout), sent).sum().backward()
    del sent, upstream
    assert not live(exchange_) and kept() is None


def test_an_exchange_dropped_without_close_releases_its_group():
    def model():
        group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32")
        exchange_ = Exchange(group)
        over_group(exchange_, *leaves(routing(210, R, B, E, K, H))).sum().backward()
        return weakref.ref(group)

    kept = model()
    gc.collect()
    assert kept() is None


class _Block(torch.nn.Module):
    """A MoE block: a linear layer, then linear experts (a parameter) over an Exchange held as a
    plain attribute (the model's own, as a process group handle is)."""

    def __init__(self, exchange, maps):
        super().__init__()
        self.linear = torch.nn.Linear(H, H)
        self.maps = torch.nn.Parameter(maps)
        self.exchange = exchange

    def forward(self, x, idx, w):
        return over_group(self.exchange, self.linear(x), idx, w, self.maps)


def test_a_deep_copy_of_a_model_holding_an_exchange_shares_the_exchange():
    """``ema = copy.deepcopy(model)`` (an EMA of the weights) raised NotCopyableError (the
    Exchange's group cannot be copied): the copy now holds the same Exchange, with parameters of
    its own, and both run training steps that equal the dense block's. Pickling stays refused."""
    import copy
    import pickle

    ex = exchange("ht", "flat")
    x, idx, w, maps = routing(3, R, B, E, K, H)
    model = _Block(ex, maps)
    ema = copy.deepcopy(model)
    assert ema.exchange is ex and ema.maps is not model.maps and torch.equal(ema.maps, model.maps)
    memo = {}
    assert copy.deepcopy(ex, memo) is ex and memo[id(ex)] is ex
    with torch.no_grad():
        ema.maps.mul_(0.5)   # (the copy's parameters are its own: the EMA moves them)
    for m in (model, ema):   # each a training step through the one exchange, checked against the dense block
        got = m(x, idx, w)
        want = dense(m.linear(x), idx, w, m.maps)
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
        got.square().sum().backward()
        dense_maps = m.maps.detach().clone().requires_grad_()
        dense(m.linear(x).detach(), idx, w, dense_maps).square().sum().backward()
        assert (m.maps.grad - dense_maps.grad).abs().max() <= 1e-5 * max(1.0, dense_maps.grad.abs().max().item())
    assert not torch.equal(model.maps.grad, ema.maps.grad)
    del got
    assert not live(ex)   # (both steps ended)
    shallow = copy.copy(ex)   # a shallow copy: another Exchange of the same registration, as before
    assert shallow is not ex and shallow.id == ex.id and shallow.group is ex.group
    with pytest.raises(ep.NotCopyableError, match=r"^Exchange: cannot be pickled; it registers VirtualGroup"):
        pickle.dumps(ex)
    with pytest.raises(ep.NotCopyableError):
        pickle.dumps(model)


def test_a_shallow_copy_of_an_exchange_subclass_is_of_that_subclass():
    """Exchange's __copy__ (made when pickling was refused, which copy.copy would otherwise have
    used) built a plain Exchange: a subclass's copy lost its class and the methods it adds or
    overrides, where copy.copy had kept it before (the default reduction's class)."""
    import copy

    class Logged(Exchange):
        calls = 0

        def dispatch(self, *arguments):
            Logged.calls += 1
            return super().dispatch(*arguments)

    ex = Logged(exchange("ht", "flat").group)
    shallow = copy.copy(ex)
    assert type(shallow) is Logged and shallow.id == ex.id and shallow.group is ex.group
    x, idx, w, _ = routing(3, R, B, E, K, H)
    shallow.dispatch(x, idx, w)
    assert Logged.calls == 1
    assert copy.deepcopy(ex) is ex
