"""An NCCL rank's buffer slots: the group's own receive, expert-output and weight-gradient
buffers of one slot (epGroupGetBuffer), seen as torch tensors with no copy, and the counts and
combined rows this rank's calls write, made once."""

import ctypes

from . import _abi
from ._arrays import fixed_alias
from ._library import call

# __cuda_array_interface__ type strings; bf16 (which NumPy does not know) is seen as int16 and viewed.
# e4m3 rows are seen as uint8 and viewed as float8_e4m3fn.
_TYPESTR = {_abi.BF16: "<i2", _abi.F16: "<f2", _abi.F32: "<f4", _abi.I32: "<i4", _abi.I64: "<i8", _abi.U8: "|u1",
            _abi.E4M3: "|u1"}


class _DeviceMemory:
    """Device memory of the group, described for torch.as_tensor; it keeps the group alive while
    a tensor over it lives (the memory goes when the group is closed: do not use the tensors
    after close())."""

    def __init__(self, descriptor, owner):
        shape = tuple(int(descriptor.sizes[i]) for i in range(descriptor.ndim))
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": shape, "typestr": _TYPESTR[descriptor.dtype],
                                         "data": (int(descriptor.data or 0), False), "version": 3, "strides": None}


class NCCLSlot:
    """Buffer slot `index` of `group` (an NCCLGroup)."""

    def __init__(self, group, index):
        import torch

        self.index = index
        self.use = 0   # dispatches into this slot so far
        device = torch.device("cuda", group._device)
        self.descriptors = {}

        def buffer(kind):
            descriptor = _abi.new(_abi.Tensor)
            try:
                call("epGroupGetBuffer", group._group, index, kind, ctypes.byref(descriptor))
            except Exception:
                return None, None   # this algorithm and layout have no such buffer
            tensor = torch.as_tensor(_DeviceMemory(descriptor, group), device=device)
            if descriptor.dtype == _abi.BF16:
                tensor = tensor.view(torch.bfloat16)
            elif descriptor.dtype == _abi.E4M3:
                tensor = tensor.view(torch.float8_e4m3fn)
            return tensor, descriptor

        self.tokens, self.tokens_desc = buffer(_abi.BUFFER_RECEIVED_TOKENS)
        self.idx, self.idx_desc = buffer(_abi.BUFFER_RECEIVED_TOPK_IDX)
        self.weights, self.weights_desc = buffer(_abi.BUFFER_RECEIVED_TOPK_WEIGHTS)
        self.expert_outputs, _ = buffer(_abi.BUFFER_EXPERT_OUTPUTS)
        self.weight_grads, self.grads_desc = buffer(_abi.BUFFER_WEIGHT_GRADIENTS)
        # FP8 groups: the received e4m3 rows' scales (float32, or int32 words of exponent bytes).
        self.scales, self.scales_desc = buffer(_abi.BUFFER_RECEIVED_SCALES) if group.fp8 else (None, None)
        if group.recv_routing_shape is None:
            self.idx = self.weights = self.idx_desc = self.weights_desc = None
        own_outputs(self, group, device)


def own_outputs(slot, group, device):
    """Makes `slot`'s outputs that are this rank's own memory, not the group's: the expert counts
    and the combined rows (and weight gradients) this rank's calls write. The slot keeps them
    (`_kept`) and hands out aliases that cannot move them (_arrays.fixed_alias): the library
    writes at these addresses every call, and a result's tensor resized or rebound by the
    caller must not free them. Also the package's own tensors over the slot's received routing
    and counts (`idx_own`, `weights_own`, `counts_own`), which the torch ops read and write:
    not the objects results hand out, which a caller may rebind (``.data =``, ``set_()``)."""
    import torch

    slot.idx_own = None if slot.idx is None else slot.idx.detach()
    slot.weights_own = None if slot.weights is None else slot.weights.detach()

    l, r, b = group.local_experts, group.ranks, group.max_tokens
    dtypes = {_abi.BF16: torch.bfloat16, _abi.F16: torch.float16, _abi.F32: torch.float32, _abi.U8: torch.uint8}
    slot._kept = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in
                  (((l,), torch.int32), ((l, r), torch.int32), ((b, group.hidden), dtypes[group._element]), ((b, group.top_k), torch.float32))]
    slot.counts, slot.source_counts, slot.combined, slot.combined_grads = (fixed_alias(kept) for kept in slot._kept)
    slot.counts_own = slot._kept[0]
    slot.counts_desc = group._describe_output(slot.counts, _abi.I32, "expert_counts")
    slot.source_desc = group._describe_output(slot.source_counts, _abi.I32, "expert_source_counts")
