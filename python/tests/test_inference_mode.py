"""A group's buffer slots (and the views it hands out of them) are made by the first call that
uses them, which may run under torch.inference_mode (a serving engine's warm-up, an RL rollout).
Made as inference tensors, every later call outside inference mode that landed in that slot
handed out inference tensors (autograd may not save them: "Inference tensors cannot be saved for
backward"), and in-place updates of them there failed. They are made as normal tensors."""

import torch

import expert_parallel as ep

R, E, K, H, B = 2, 4, 2, 8, 3


def test_slots_made_under_inference_mode_serve_later_calls_outside_it():
    group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32", algorithm="ht",
                            layout="flat", device="cpu")
    x = torch.arange(R * B * H, dtype=torch.float32).reshape(R, B, H)
    idx = torch.tensor([[[0, 3], [1, -1], [2, 3]], [[1, 2], [-1, 0], [3, 1]]])
    w = torch.rand(R, B, K)
    with torch.inference_mode():
        for _ in range(group.buffer_slots):   # every slot made here
            out = group.dispatch(x, idx, w)
            want = [t.clone() for t in group.combine(out.received, out.handle)]
    weights = torch.ones(H, requires_grad=True)
    for _ in range(group.buffer_slots):
        out = group.dispatch(x, idx, w)
        combined = group.combine(out.received, out.handle)
        handed_out = list(out.tokens) + [out.received, out.expert_counts] + list(combined)
        assert not any(t.is_inference() for t in handed_out)
        assert all(torch.equal(a, b) for a, b in zip(combined, want))
        (out.tokens[0] * weights).sum().backward()   # autograd may save them
        combined[0].add_(0)                           # and they may be updated in place
    assert weights.grad is not None


def test_an_nccl_groups_slots_made_under_inference_mode_are_normal_tensors(monkeypatch):
    """An NCCLGroup makes its slots' tensors when it is made, which the DeepEP adapter does in the
    first call of a shape (under inference_mode in a serving engine's warm-up): its combine copies
    x into the slot's expert_outputs in place, and the torch ops copy the per-slot weights into
    the slot and clear the received rows (here with the CPU stand-in of NCCLSlot)."""
    from expert_parallel import nccl_group
    from test_nccl_group_calls import _Slot, cpu_rank_group

    model = ep.VirtualGroup(ranks=1, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32", algorithm="ht",
                            layout="expert_major_padded", alignment=2)
    group = cpu_rank_group(model, lambda name: None)
    monkeypatch.setattr(nccl_group, "NCCLSlot", _Slot)
    with torch.inference_mode():
        group._slots = group._make_slots(2)
    for slot in group._slots:
        for tensor in (slot.tokens, slot.idx, slot.weights, slot.expert_outputs, slot.counts, slot.source_counts):
            assert not tensor.is_inference()
        slot.expert_outputs.copy_(torch.ones_like(slot.expert_outputs))   # the adapter's stage, outside inference mode
        slot.weights.zero_()
