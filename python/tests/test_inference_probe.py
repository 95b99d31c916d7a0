"""Defects a vLLM / SGLang integrator's probe of the low-latency path met, each with the call that
showed it, on the CPU backend."""

import numpy as np
import pytest
import torch

import expert_parallel as ep

R, E, H, K, B = 4, 8, 16, 2, 4


def routing(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(R, B, H, generator=gen)
    idx = torch.stack([torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(B)]) for _ in range(R)]).int()
    w = torch.rand(R, B, K, generator=gen)
    return x, idx, w


def test_a_steps_layout_read_after_a_rank_was_masked_is_the_steps():
    # A handle dispatched with every rank active: its layout, read after deactivate(1), said rank 1
    # received nothing (the package read the group's current mask, not the step's).
    group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32")
    x, idx, w = routing()
    with group.handle() as h:
        out = group.dispatch(x, idx, w, handle=h)
        counts = out.expert_counts.tolist()
        group.deactivate(1)
        assert [info.expert_counters for info in out.layout] == counts
        assert out.layout[1].received_total == sum(counts[1]) > 0
    group.clean()


def test_a_masked_ranks_layout_in_a_later_step_is_empty():
    group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32")
    x, idx, w = routing()
    group.deactivate(1)
    out = group.dispatch(x, idx, w)
    assert out.layout[1].expert_counters == [0, 0] and out.layout[1].received_total == 0
    assert [info.expert_counters for info in out.layout] == out.expert_counts.tolist()


def test_fp8_configuration_errors_name_the_keywords():
    # "fp8Source = 'pass_through'; needs an fp8Scales mode": the C struct's fields.
    with pytest.raises(ep.InvalidArgumentError) as caught:
        ep.VirtualGroup(ranks=2, experts=4, hidden=128, top_k=2, max_tokens=2, dtype="bf16", fp8_source="pass_through")
    text = str(caught.value)
    assert "fp8_source = 'pass_through'; needs an fp8 mode" in text, text
    assert "fp8Source" not in text and "fp8Scales" not in text, text
