"""torch.compile(fullgraph=True) of a MoE through expert_parallel.torch on the CPU backend: no
graph break (fullgraph raises on one), and the compiled forward and backward equal eager mode:
bit for bit with aot_eager (the same kernels run), within 1e-5 with inductor (which fuses and
reorders the experts' arithmetic; it needs a C++ compiler, as CI has)."""

import pytest
import torch

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
