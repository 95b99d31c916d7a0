"""examples/moe_layer.py, the DeepSeek-style MoE block over expert parallelism, in its CPU form:
the script runs and reports agreement with the dense block, and in every layout the block's
output and the gradients of its input and of every parameter equal the dense reference within
1e-5 (relative to the largest value), eagerly and under torch.compile(fullgraph=True)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import expert_parallel as ep
from conftest import ROOT
from expert_parallel.torch import Exchange

SCRIPT = ROOT / "examples" / "moe_layer.py"


def example():
    spec = importlib.util.spec_from_file_location("moe_layer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def block(module, layout, shared_ffn=24):
    group = ep.VirtualGroup(ranks=4, experts=16, hidden=32, top_k=4, max_tokens=8, dtype="f32",
                            algorithm=module.ALGORITHMS[layout], layout=layout,
                            alignment=4 if layout == "expert_major_padded" else 1)
    return module.MoEBlock(Exchange(group), ffn=16, shared_ffn=shared_ffn)


def test_the_script_runs_on_the_cpu_backend_and_agrees_with_the_dense_block():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("ok: largest relative difference"), last
    assert float(last.split("difference ")[1].split()[0]) <= 1e-5


@pytest.mark.parametrize("layout", ["expert_major", "rank_major", "flat", "expert_major_padded"])
@pytest.mark.parametrize("shared_ffn", [24, None])
def test_forward_and_backward_equal_the_dense_block(layout, shared_ffn):
    module = example()
    moe = block(module, layout, shared_ffn)
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(3))
    differences = module.compare(moe, x)
    assert set(differences) >= {"output", "grad x", "grad gate", "grad w1", "grad w3", "grad w2"}
    assert ("grad shared.0" in differences) == (shared_ffn is not None)
    assert max(differences.values()) <= 1e-5, differences


def test_every_parameter_gets_a_gradient_through_the_group():
    module = example()
    moe = block(module, "flat")
    moe(torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(4))).square().sum().backward()
    for name, parameter in moe.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_the_compiled_block_equals_the_dense_block():
    torch._dynamo.reset()
    module = example()
    moe = block(module, "expert_major_padded")
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(5))
    assert max(module.compare(moe, x, backend="aot_eager").values()) <= 1e-5


def test_a_misrouted_block_is_caught():
    """The comparison can fail: experts placed on the wrong ranks differ from the dense block."""
    module = example()
    moe = block(module, "expert_major")
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(6))
    right = moe.experts
    moe.experts = lambda sent: right(sent._replace(tokens=sent.tokens.roll(1, dims=1)))   # zone l gets expert l+1's rows
    assert module.compare(moe, x)["output"] > 1e-2
