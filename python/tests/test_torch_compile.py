"""torch.compile(fullgraph=True) of a MoE through expert_parallel.torch on the CPU backend: no
graph break (fullgraph raises on one), and the compiled forward and backward equal eager mode:
bit for bit with aot_eager (the same kernels run), within 1e-5 with inductor (which fuses and
reorders the experts' arithmetic; it needs a C++ compiler, as CI has)."""

import re

import pytest
import torch

import expert_parallel as ep
from expert_parallel.torch import Exchange
from test_torch_autograd import B, E, H, K, LAYOUTS, R, exchange, run
from torch_moe import over_group, routing


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_compiled_forward_and_backward_equal_eager(algorithm, layout, backend):
    torch._dynamo.reset()
    ex = exchange(algorithm, layout)
    compiled = torch.compile(lambda *a: over_group(ex, *a), fullgraph=True, backend=backend)
    for seed in range(2):   # the second call runs the compiled graph again, new routing
        inputs = routing(20 + seed, R, B, E, K, H)
        eager = run(lambda *a: over_group(ex, *a), inputs)
        got = run(compiled, inputs)
        for name, a, b in zip(("combined", "grad x", "grad topk_weights", "grad experts"), got, eager):
            if backend == "aot_eager":
                assert torch.equal(a, b), f"{layout} seed {seed}: {name}"
            else:
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"{layout} seed {seed}: {name}"


def test_the_compiled_graph_calls_the_ops():
    """The graph dynamo captures holds the custom ops themselves (not a trace of their insides)."""
    torch._dynamo.reset()
    ex = exchange("ht", "flat")
    graphs = []

    def capture(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(lambda *a: over_group(ex, *a), fullgraph=True, backend=capture)
    compiled(*routing(30, R, B, E, K, H))
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert "expert_parallel.dispatch.default" in targets and "expert_parallel.combine.default" in targets


def test_one_dynamic_graph_serves_several_token_counts():
    """dynamic=True: the fake implementations take their shapes from the inputs, so one graph
    runs for every B up to max_tokens, each equal to the dense reference."""
    from torch_moe import dense

    torch._dynamo.reset()
    ex = exchange("ll", "rank_major")
    compiled = torch.compile(lambda *a: over_group(ex, *a), fullgraph=True, backend="aot_eager", dynamic=True)
    for tokens in (5, 3, 4):
        inputs = routing(40 + tokens, R, tokens, E, K, H)
        got, want = run(compiled, inputs), run(dense, inputs)
        for a, b in zip(got, want):
            assert a.shape[:2] == b.shape[:2] and torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"B = {tokens}"


WRONG = [   # (what changes, the message): each argument named as Exchange names it
    (lambda x, idx, w: (x.double(), idx, w), "x: dtype torch.float64; must be torch.float32"),
    (lambda x, idx, w: (x[..., :-1], idx, w), rf"x: shape \[{R}, {B}, {H - 1}\]; must be \[{R}, B, {H}\]"),
    (lambda x, idx, w: (torch.cat([x, x], 1), torch.cat([idx, idx], 1), torch.cat([w, w], 1)),
     rf"x: {2 * B} tokens per rank; must be ≤ max_tokens \({B}\)"),
    (lambda x, idx, w: (x, idx.float(), w), "topk_idx: dtype torch.float32; must be torch.int32 or torch.int64"),
    (lambda x, idx, w: (x, idx[:, :-1], w), rf"topk_idx: shape \[{R}, {B - 1}, {K}\]; must be \[{R}, {B}, {K}\]"),
    (lambda x, idx, w: (x, idx, w.double()), "topk_weights: dtype torch.float64; must be torch.float32"),
    (lambda x, idx, w: (x, idx, w[..., :-1]), rf"topk_weights: shape \[{R}, {B}, {K - 1}\]"),
]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("case", range(len(WRONG)))
def test_wrong_arguments_are_named_as_the_exchange_names_them(case, compiled):
    """A wrong x, topk_idx or topk_weights is refused under its own name (the group's checks
    would name the arrays the ops pass it: "out tokens", "xs"), eagerly and while torch.compile
    traces (the fake implementation checks too: the error reaches the caller inside torch's
    TorchRuntimeError, which carries its text)."""
    torch._dynamo.reset()
    ex = exchange("ht", "flat")
    change, message = WRONG[case]
    x, idx, w, _ = routing(50, R, B, E, K, H)

    def step(x, idx, w):
        sent = ex.dispatch(x, idx, w)
        return ex.combine(sent.tokens, sent)

    fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
    with pytest.raises(Exception) as caught:
        fn(*change(x, idx, w))
    # Compiled: raised while tracing (the fake implementation), not when the graph runs.
    wanted = torch._dynamo.exc.TorchRuntimeError if compiled else ep.InvalidArgumentError
    assert isinstance(caught.value, wanted), repr(caught.value)
    assert re.search(message, str(caught.value)), str(caught.value)


COMBINE_WRONG = [   # (layout, what changes, the message)
    ("rank_major", lambda y, w: (y.double(), w), "expert_outputs: dtype torch.float64; must be torch.float32"),
    ("rank_major", lambda y, w: (y[..., :-1], w), r"expert_outputs: shape \[.*\]; must be \[.*\], as dispatched.tokens"),
    # LL expert-major: dispatch does not take the weights; combine applies them and checks them.
    ("expert_major", lambda y, w: (y, w.double()), "topk_weights: dtype torch.float64; must be torch.float32"),
    ("expert_major", lambda y, w: (y, w[..., :-1]), rf"topk_weights: shape \[{R}, {B}, {K - 1}\]; must be \[{R}, {B}, {K}\]"),
]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("case", range(len(COMBINE_WRONG)))
def test_wrong_combine_arguments_are_named(case, compiled):
    torch._dynamo.reset()
    layout, change, message = COMBINE_WRONG[case]
    ex = exchange("ll", layout)
    x, idx, w, _ = routing(51, R, B, E, K, H)

    def step(x, idx, w):
        sent = ex.dispatch(x, idx, w)
        y, weights = change(sent.tokens, w)
        return ex.combine(y, sent._replace(weights=weights))   # (the source weights LL expert-major's combine applies)

    fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
    with pytest.raises(Exception) as caught:
        fn(x, idx, w)
    wanted = torch._dynamo.exc.TorchRuntimeError if compiled else ep.InvalidArgumentError
    assert isinstance(caught.value, wanted), repr(caught.value)
    assert re.search(message, str(caught.value)), str(caught.value)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("wrong", ["routing", "weights"])
def test_ll_expert_majors_routing_and_weights_of_two_token_counts_are_named(wrong, compiled):
    """LL expert-major's combine takes the routing and the source weights: one of them of another
    B. Eager knows the step's B and names the one that differs from it; traced, the step's B is
    unknown and the fake implementation checked the weights against the routing, naming the
    weights for a routing of another step (which eager names). It now names both."""
    torch._dynamo.reset()
    ex = exchange("ll", "expert_major")
    x, idx, w, _ = routing(52, R, B, E, K, H)

    def step(x, idx, w):
        sent = ex.dispatch(x, idx, w)
        if wrong == "routing":
            return ex.combine(sent.tokens, sent._replace(routing=sent.routing[:, :-1], weights=w))
        return ex.combine(sent.tokens, sent._replace(weights=w[:, :-1]))

    fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
    with pytest.raises(Exception) as caught:
        fn(x, idx, w)
    routing_named = rf"dispatched.routing \(the combine op's topk_idx\): shape \[{R}, {B - (wrong == 'routing')}, {K}\], "
    if compiled:
        assert isinstance(caught.value, torch._dynamo.exc.TorchRuntimeError), repr(caught.value)
        message = routing_named + rf".*; topk_weights: shape \[{R}, {B - (wrong == 'weights')}, {K}\]"
    elif wrong == "routing":
        message = routing_named + rf"{B - 1} tokens per rank; the step of dispatched.step dispatched {B}"
    else:
        message = rf"^topk_weights: shape \[{R}, {B - 1}, {K}\]; must be \[{R}, {B}, {K}\]"
    assert re.search(message, str(caught.value)), str(caught.value)


def test_a_dynamic_graph_is_compiled_once_for_every_token_count():
    """The ops' integer arguments are SymInts (as custom_op inferred them): the backward combine's
    `tokens` is B, which under dynamic=True stays symbolic instead of specialising the graph (and
    recompiling it) for each B."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    ex = exchange("ht", "flat")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda *a: over_group(ex, *a), fullgraph=True, backend=counter, dynamic=True)
    for tokens in (5, 3, 4):
        run(compiled, routing(50 + tokens, R, tokens, E, K, H))
    assert counter.frame_count == 1
    assert "SymInt group, SymInt tokens)" in str(torch.ops.expert_parallel.backward_combine.default._schema)


def test_the_ops_are_pt2_compliant():
    """custom_op tagged its ops pt2_compliant_tag, which only_allow_pt2_compliant_ops requires."""
    for name in ("dispatch", "combine", "backward_dispatch", "backward_combine"):
        assert torch.Tag.pt2_compliant_tag in getattr(torch.ops.expert_parallel, name).default.tags, name
    torch._dynamo.reset()
    ex = exchange("ll", "rank_major")
    with torch._dynamo.config.patch(only_allow_pt2_compliant_ops=True):
        compiled = torch.compile(lambda *a: over_group(ex, *a), fullgraph=True, backend="aot_eager")
        inputs = routing(60, R, B, E, K, H)
        got = run(compiled, inputs)
    for a, b in zip(got, run(lambda *a: over_group(ex, *a), inputs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dynamic", [False, True])
def test_inductor_gives_ll_expert_major_token_gradients(dynamic):
    """LL expert-major's combine backward scales the rows' gradients by the weights gathered into
    their slots. Built as ``zeros(...).index_put(..., accumulate=True)``, torch 2.11's inductor
    (CPU) fused that with the gather of the chosen expert outputs and wrote the zeros after the
    accumulation: every token gradient came out 0 (at 3 ranks, 6 experts, top-3, B = max_tokens
    = 4). A scatter_add into the flat slots compiles right; this shape is the one that showed it.
    (Inductor's caches are off here: a cached graph of the old backward would hide a change.)"""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        _check_ll_expert_major_under_inductor(dynamic)


def _check_ll_expert_major_under_inductor(dynamic):
    torch._dynamo.reset()
    ranks, experts, top_k, tokens = 3, 6, 3, 4
    group = ep.VirtualGroup(ranks=ranks, experts=experts, hidden=H, top_k=top_k, max_tokens=tokens, dtype="f32",
                            algorithm="ll", layout="expert_major")
    ex = Exchange(group)
    compiled = torch.compile(lambda *a: over_group(ex, *a), fullgraph=True, backend="inductor", dynamic=dynamic)
    for seed, b in ((50, tokens), (51, tokens), (52, 3)):
        inputs = routing(seed, ranks, b, experts, top_k, H)
        eager = run(lambda *a: over_group(ex, *a), inputs)
        got = run(compiled, inputs)
        for name, a, want in zip(("combined", "grad x", "grad topk_weights", "grad experts"), got, eager):
            assert torch.allclose(a, want, atol=1e-5, rtol=1e-5), f"B = {b}, seed {seed}: {name}"
