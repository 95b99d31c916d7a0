"""A group's buffer slots are memory the library writes at fixed addresses, call after call,
and results hand the caller tensors over it (the received rows and routing, the expert counts,
the combined rows). A caller who resized one of them (`resize_`, a storage `resize_`) moved
the slot's memory, and one who rebound one (`.data =`, `set_()`) freed it where the tensor was
the slot's own (`expert_counts`): the next dispatch into the slot wrote at the old, freed
address. Slot memory is now kept by the group and handed out through aliases that cannot
move it."""

import gc

import numpy as np
import pytest
import torch

import expert_parallel as ep
from test_hazards_session31 import group   # the small CPU group (f32, R 2, E 4, H 8, K 2, B 3)
from test_nccl_group_calls import recorded  # noqa: F401  (the NCCL rank over CPU tensors, a fixture)
from test_tensor_memory import step

GROW = [lambda t: t.resize_(4096), lambda t: t.untyped_storage().resize_(1 << 16)]


def handed_out(result, combined):
    """Every tensor a dispatch result and its combine hand the caller."""
    tensors = [result.expert_counts, result.expert_source_counts, *result.tokens, *combined]
    tensors += [t for t in (result.topk_idx or []) + (result.topk_weights or []) if t is not None]
    return [t for t in tensors if t is not None]


@pytest.mark.parametrize("algorithm", ["ll", "ht"])
@pytest.mark.parametrize("grow", [0, 1])
def test_a_slots_tensors_cannot_be_grown_and_the_slot_works_on(algorithm, grow):
    g, fresh = group(algorithm=algorithm, buffer_slots=1), group(algorithm=algorithm, buffer_slots=1)
    x, idx, w = step()
    out = g.dispatch(x, idx, w)
    combined = g.combine(torch.stack(out.tokens).clone(), out.handle)
    tensors = handed_out(out, combined)
    assert len(tensors) >= 6
    addresses = [t.data_ptr() for t in tensors]
    for t in tensors:
        with pytest.raises(RuntimeError, match="not resizable|setStorage"):
            GROW[grow](t)
    # (torch sets a tensor's new sizes before it finds the storage cannot grow: the tensors are
    # left describing more than their memory, as they would be anywhere; the memory stays put.)
    assert [t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size() for t in tensors] == addresses
    x2 = x.flip(1).contiguous()
    g.dispatch(x2, idx, w)
    want = fresh.dispatch(x2, idx, w)
    received, counts = slot_memory(g)[0], slot_memory(g)[-3]
    assert torch.equal(counts, want.expert_counts)
    assert all(torch.equal(received[i, :len(t)], t) for i, t in enumerate(want.tokens))


def slot_memory(g):
    """The memory of `g`'s buffer slot 0 as the group keeps it: received rows first, then (if
    any) scales, routing, then expert counts, source counts and combined rows."""
    return g._slots[0]._allocate.kept


@pytest.mark.parametrize("how", ["data", "set_"])
def test_rebinding_a_results_counts_frees_no_memory_the_slot_writes(how):
    g = group(buffer_slots=1)
    x, idx, w = step()
    out = g.dispatch(x, idx, w)
    want = out.expert_counts.clone()
    counts_address = out.expert_counts.data_ptr()
    kept = [t.untyped_storage()._weak_ref() for t in slot_memory(g)]
    if how == "data":
        out.expert_counts.data = torch.zeros(5, dtype=torch.int32)
    else:
        out.expert_counts.set_(torch.zeros(5, dtype=torch.int32))
    del out
    gc.collect()
    assert not any(torch.UntypedStorage._expired(ref) for ref in kept)
    counts = slot_memory(g)[-3]
    assert counts.data_ptr() == counts_address
    counts.zero_()
    g.dispatch(x, idx, w)
    assert torch.equal(counts, want)


def test_a_numpy_slots_arrays_cannot_be_resized():
    g = ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32", buffer_slots=1)
    x, idx, w = (t.numpy() for t in step())
    out = g.dispatch(x, idx, w)
    for array in (out.expert_counts, out.expert_source_counts, out.received):
        with pytest.raises(ValueError):
            array.resize(4096, refcheck=False)
    again = g.dispatch(x, idx, w)
    assert np.array_equal(again.expert_counts, out.expert_counts)


def test_an_nccl_ranks_own_outputs_cannot_be_grown_or_freed(recorded):  # noqa: F811
    g, calls = recorded(dtype="f32")
    x, idx, w = torch.randn(3, g.hidden), torch.tensor([[0, 1, 2, 3]] * 3, dtype=torch.int32), torch.rand(3, g.top_k)
    out = g.dispatch(x, idx, w)
    combined = g.combine(out.tokens.clone(), out.handle)
    for t in (out.expert_counts, out.expert_source_counts, combined):
        for grow in GROW:
            with pytest.raises(RuntimeError, match="not resizable|setStorage"):
                grow(t)
    address = out.expert_counts.data_ptr()
    out.expert_counts.set_(torch.zeros(5, dtype=torch.int32))
    del out
    gc.collect()
    g.dispatch(x, idx, w)   # (into the other slot)
    calls.clear()
    g.dispatch(x, idx, w)   # into the slot of the rebound counts again
    written = [arguments for name, arguments in calls if name == "epGroupDispatchStacked"][0][0].expertCounts.data
    assert written == address and g._slots[0]._kept[0].data_ptr() == address


def test_a_slot_buffer_of_a_type_dlpack_refuses_is_still_fixed(monkeypatch):
    """torch before 2.7 refuses float8 through DLPack ("float8 types are not supported by
    dlpack"): an FP8 group's e4m3 slot buffers go through bytes and come back as e4m3, still
    over memory that cannot grow."""
    from torch.utils import dlpack

    from expert_parallel._arrays import fixed_alias

    real = dlpack.to_dlpack

    def older(tensor):
        if tensor.dtype == torch.float8_e4m3fn:
            raise RuntimeError("float8 types are not supported by dlpack")
        return real(tensor)

    monkeypatch.setattr(dlpack, "to_dlpack", older)
    kept = torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    alias = fixed_alias(kept)
    assert alias.dtype == torch.float8_e4m3fn and alias.shape == kept.shape and alias.data_ptr() == kept.data_ptr()
    with pytest.raises(RuntimeError, match="not resizable"):
        alias.untyped_storage().resize_(1 << 16)
