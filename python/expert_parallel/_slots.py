"""A virtual group's buffer slots: the receive buffers a dispatch writes (with the received
routing and the per-expert counts) and the combined rows a combine writes, allocated once, on
first use, and reused by every call that lands in the slot; with the descriptors the library
reads, made once."""

import ctypes

from . import _abi, _fast
from ._arrays import Allocator, outside_inference_mode

_SIZE_HINT = "lower max_tokens or hidden (HT: set max_recv_tokens), or buffer_slots"


class Slot:
    """Buffer slot `index` of `group`, its arrays made like `like` (NumPy arrays or torch tensors
    on the group's device)."""

    def __init__(self, group, index, like):
        r, l, k, b, h = group.ranks, group.local_experts, group.top_k, group.max_tokens, group.hidden
        self.index = index
        self.use = 0   # dispatches into this slot so far
        self.kind = type(like)
        allocate = Allocator(like)
        element = group._element
        element_dtype = None   # the element type's own array type (NumPy bf16: uint16 bits)
        recv, routing = group.recv_shape, group.recv_routing_shape
        name = f"buffer slot {index}"
        received_element = group._recv_element   # e4m3 for an FP8 group
        self.received = allocate.zeros((r,) + recv, received_element, element_dtype, name=f"{name} tokens", hint=_SIZE_HINT, fixed=True)
        self.scales = None
        if group.recv_scales_shape is not None:
            self.scales = allocate.zeros((r,) + group.recv_scales_shape, group._scale_type, name=f"{name} scales", hint=_SIZE_HINT, fixed=True)
        self.received_idx = self.received_w = None
        if routing is not None:
            self.received_idx = allocate.zeros((r,) + routing, _abi.I32, name=f"{name} topk_idx", hint=_SIZE_HINT, fixed=True)
            self.received_w = allocate.zeros((r,) + routing, _abi.F32, name=f"{name} topk_weights", hint=_SIZE_HINT, fixed=True)
        self.counts = allocate.zeros((r, l), _abi.I32, name=f"{name} expert_counts", fixed=True)
        self.source_counts = allocate.zeros((r, l, r), _abi.I32, name=f"{name} expert_source_counts", fixed=True)
        self.combined = allocate.zeros((r, b, h), element, element_dtype, name=f"{name} combined tokens", fixed=True)
        self.weight_grads = None   # backward HT only: made on first use
        self._allocate = allocate
        self._group = group

        # Views handed out per call, made once.
        self.views = [self.received[i] for i in range(r)]
        self.idx_views = None if routing is None else [self.received_idx[i] for i in range(r)]
        self.w_views = None if routing is None else [self.received_w[i] for i in range(r)]
        # The per-slot weights as the group's own combine reads them (handle.received_weights):
        # views of its own, not those results hand out, which a caller may rebind (.data =).
        self.w_own = None if routing is None else [self.received_w[i] for i in range(r)]
        self.scale_views = None if self.scales is None else [self.scales[i] for i in range(r)]
        self._targets = None        # the tokens per rank the combine outputs point at
        self._targets_backward = None   # and whether for backward HT (with the weight gradients)
        self._target_views = None

        # The dispatch outputs, fixed for the slot's life.
        device = group._device
        self.recv_desc = self._stacked(self.received, received_element, recv, device)
        self.scales_desc = None if self.scales is None else self._stacked(self.scales, group._scale_type, group.recv_scales_shape, device)
        self.idx_desc = None if routing is None else self._stacked(self.received_idx, _abi.I32, routing, device)
        self.w_desc = None if routing is None else self._stacked(self.received_w, _abi.F32, routing, device)
        self.counts_desc = self._stacked(self.counts, _abi.I32, (l,), device)
        self.source_desc = self._stacked(self.source_counts, _abi.I32, (l, r), device)
        self.dispatch_outputs = (_abi.DispatchOutputs * r)()
        for i in range(r):
            self.dispatch_outputs[i] = _abi.new(
                _abi.DispatchOutputs, tokens=self.recv_desc.pointers[i],
                topkIdx=None if self.idx_desc is None else self.idx_desc.pointers[i],
                topkWeights=None if self.w_desc is None else self.w_desc.pointers[i],
                layoutInfo=None, expertCounts=self.counts_desc.pointers[i],
                expertSourceCounts=self.source_desc.pointers[i],
                scales=None if self.scales_desc is None else self.scales_desc.pointers[i])

        # The same outputs for the stacked calls: (argument, address of rank 0's part, type).
        def base(array, ep_type):
            return 0 if array is None else _fast.look(array, {ep_type})[0]

        self.stacked_outputs = [
            ("receivedTokens", base(self.received, received_element), received_element),
            ("receivedTopkIdx", base(self.received_idx, _abi.I32), _abi.I32),
            ("receivedTopkWeights", base(self.received_w, _abi.F32), _abi.F32),
            ("receivedScales", base(self.scales, group._scale_type), group._scale_type or 0),
            ("expertCounts", base(self.counts, _abi.I32), _abi.I32),
            ("expertSourceCounts", base(self.source_counts, _abi.I32), _abi.I32),
        ]
        self._base = base
        # The stacked calls' structs of this slot (the group makes them on first use): the
        # dispatch's points at the slot's buffers for good; the combine's fixed fields were
        # written for `combine_kind`.
        self.dispatch_call = self.combine_call = None
        self.combine_kind = None

        # The combine outputs: rank i's rows at combined[i, :B_i], patched per call.
        self.out_desc = _fast.Descriptors(r, device, element, (h,))
        self.out_grad_desc = _fast.Descriptors(r, device, _abi.F32, (k,))
        self.combine_outputs = (_abi.CombineOutputs * r)()
        for i in range(r):
            self.combine_outputs[i] = _abi.new(_abi.CombineOutputs, tokens=self.out_desc.pointers[i], topkWeightGradients=None)

    def stacked_address(self, name):
        """The address of rank 0's part of the slot's "topk_weights" (received per-slot weights),
        "combined" or "weight_grads" array."""
        if name == "topk_weights":
            return self._base(self.received_w, _abi.F32)
        if name == "combined":
            return self._base(self.combined, self._group._element)
        return self._base(self.weight_grads, _abi.F32)

    @staticmethod
    def _stacked(array, ep_type, shape, device):
        descriptors = _fast.Descriptors(array.shape[0], device, ep_type, shape[1:])
        base = _fast.look(array, {ep_type})[0]
        descriptors.set_all(base, shape[0], ep_type, _abi.DTYPE_SIZES[ep_type])
        return descriptors

    def combine_targets(self, tokens, backward_ht):
        """Points the combine outputs at combined[i, :tokens[i]] (and the weight gradients at
        weight_grads[i, :tokens[i]] for backward HT); returns the per-rank views (made once per
        token counts; the lists the caller's own)."""
        if backward_ht is not self._targets_backward or tokens != self._targets:   # (a list, as handles hold them)
            with outside_inference_mode(self.combined):   # (views kept for later calls, in any mode)
                self._target_views = self._point(tokens, backward_ht)
            self._targets, self._targets_backward = list(tokens), backward_ht
        views, grads = self._target_views
        return list(views), None if grads is None else list(grads)

    def combined_rows(self, tokens):
        """combine_targets(tokens, False)[0]: a forward combine's per-rank views."""
        if self._targets_backward is not False or tokens != self._targets:
            return self.combine_targets(tokens, False)[0]
        return list(self._target_views[0])

    def _point(self, tokens, backward_ht):
        group = self._group
        element = group._element
        base = _fast.look(self.combined, {element})[0]
        row_bytes = group.hidden * _abi.DTYPE_SIZES[element]
        pitch = group.max_tokens * row_bytes
        for i, b in enumerate(tokens):
            self.out_desc.set(i, base + i * pitch, b, element)
        grads = None
        if backward_ht:
            if self.weight_grads is None:
                self.weight_grads = self._allocate.zeros((group.ranks, group.max_tokens, group.top_k), _abi.F32,
                                                         name=f"buffer slot {self.index} topk_weight_gradients", fixed=True)
            grad_base = _fast.look(self.weight_grads, {_abi.F32})[0]
            grad_pitch = group.max_tokens * group.top_k * 4
            for i, b in enumerate(tokens):
                self.out_grad_desc.set(i, grad_base + i * grad_pitch, b, _abi.F32)
                self.combine_outputs[i].topkWeightGradients = self.out_grad_desc.pointers[i]
            grads = [self.weight_grads[i, :b] for i, b in enumerate(tokens)]
        else:
            for i in range(group.ranks):
                self.combine_outputs[i].topkWeightGradients = None
        return [self.combined[i, :b] for i, b in enumerate(tokens)], grads
