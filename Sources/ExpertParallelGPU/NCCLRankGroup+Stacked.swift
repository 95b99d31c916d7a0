import ExpertParallel
import ExpertParallelCUDA

/// An NCCL rank's stacked calls: each argument described once, as the virtual group's stacked
/// calls take them (VirtualGPUGroup+Stacked.swift), with one part, this rank's. A dispatch with
/// `call.topkIdx` is the step's update and its dispatch in one call, and the checks read the
/// descriptions, building no view: the host cost of a torchrun job's step.
extension NCCLRankGroup {
    /// With `call.topkIdx`: `handle`'s update and its dispatch, in one launch where `fusesUpdate`
    /// (else the update's launch and the dispatch's); without: a dispatch of
    /// `handle`'s step again, `call.tokens` its rows. The received rows go to a buffer slot's own
    /// receive buffers (`call.receivedTokens` names the slot; the received ids, weights and scales
    /// are that slot's, given or not): the peers write them. Every argument is checked
    /// first: a rejected call runs nothing and leaves the step as it was.
    public func dispatch(
        _ handle: GPUStepHandle, stacked call: StackedDispatch, direction: PassDirection = .forward, options: CallOptions = CallOptions()
    ) throws(EPError) {
        try engine.checkNothingPending()
        let step = call.topkIdx == nil ? try handle.currentStep() : nil
        guard let slot = slots.firstIndex(where: { address($0.receivedTokens) == call.received.address }) else {
            throw .invalidArgument(
                field: "received", value: "\(call.received.address)",
                requirement: "must be the receive buffer of one of this rank's \(bufferSlots) buffer slots (epGroupGetBuffer): the other ranks write it (epDispatch receives into a tensor of the caller's)")
        }
        let own = slots[slot]
        // Received ids, weights and scales not given are the slot's own, as for epDispatch.
        var call = call
        call.receivedTopkIdx = call.receivedTopkIdx ?? own.receivedIndices.map(StackedTensor.init)
        call.receivedTopkWeights = call.receivedTopkWeights ?? own.receivedWeights.map(StackedTensor.init)
        call.receivedScales = call.receivedScales ?? own.receivedScales.map(StackedTensor.init)
        // The slot's own buffers first: a wrong dtype there would make the call's checks read past
        // the buffer's bytes (and name an overlap with the slot's next buffer instead).
        try requireSlotBuffer(call.receivedTopkIdx, own.receivedIndices, "receivedTopkIdx", slot: slot)
        try requireSlotBuffer(call.receivedTopkWeights, own.receivedWeights, "receivedTopkWeights", slot: slot)
        try requireSlotBuffer(call.receivedScales, own.receivedScales, "receivedScales", slot: slot)
        let checked = try CheckedStackedDispatch(call, shapes: engine.shapes, location: location, stepTokens: step?.routing[0].tokens, parts: 1)
        // A dispatch of the step again: its count outputs (the caller's) must not be the routing the device reads until the combine.
        if let step { try checked.refuseOverlaps(routingBytes(step), parts: 1) }
        let source = SendSide(tokens: checked.address(.inputs, rank: 0), weights: checked.address(.topkWeights, rank: 0),
                              scales: checked.address(.scales, rank: 0), counts: checked.address(.expertCounts, rank: 0),
                              sourceCounts: checked.address(.expertSourceCounts, rank: 0))
        let update = call.topkIdx.map { (RoutingRows(address: checked.address(.topkIdx, rank: 0), tokens: call.tokens), $0.dtype.byteSize) }
        try enqueueDispatch(handle, source, slot: slot, update: update, options: options)
    }

    /// The combine of `handle`'s dispatched step into `call.combined`. Expert outputs in the
    /// slot's own buffer (the one its dispatch used) are read where they are; a tensor of the
    /// caller's has the rows the step received copied in first (`combine(copyingFrom:)`). HT
    /// expert-major forward takes the slot's received weights, HT backward its weight gradients.
    public func combine(
        _ handle: GPUStepHandle, stacked call: StackedCombine, direction: PassDirection = .forward, options: CallOptions = CallOptions()
    ) throws(EPError) {
        try engine.checkNothingPending()
        let step = try handle.dispatchedStep()
        let slot = try slotOfDispatch(handle)
        let own = slots[slot]
        // A caller's tensor that is not 8-byte aligned (a view at an odd element) is copied whole
        // (`combine(copyingFrom:)`): the stride checks, which want rows 8-byte aligned, see the
        // slot's buffer in its place.
        let given = call.expertOutputs.address
        var checkedCall = call
        if given % 8 != 0 { checkedCall.expertOutputs.address = address(own.expertOutputs) }
        let checked = try CheckedStackedCombine(checkedCall, stepTokens: [step.routing[0].tokens], direction: direction, shapes: engine.shapes,
                                                location: location)
        guard given == address(own.expertOutputs) else {
            var (input, output) = checked.rank(0)
            input.expertOutputs.address = UnsafeMutableRawPointer(bitPattern: UInt(given))
            do {
                try combine(copyingFrom: input, into: output, handle: handle, direction: direction, phase: options.phase,
                            stream: options.stream.map { CUDAStream(rawValue: $0) })
            } catch {
                throw CheckedStackedCombine.naming(error)   // its checks name the per-rank call's views
            }
            return
        }
        // (The copy above checks its per-rank call against the routing: checkCombine.)
        try checked.refuseOverlaps(routingBytes(step))
        if config.isExpertMajorHT, direction == .forward, let weights = own.receivedWeights {
            try requireSlotBuffer(call.topkWeights, weights, "topkWeights", slot: slot, required: true)
        }
        if config.algorithm == .highThroughput, direction == .backward, let gradients = own.weightGradients {
            try requireSlotBuffer(call.weightGradients, gradients, "weightGradients", slot: slot, required: true)
        }
        let target = CombineTarget(tokens: checked.address(.combined, rank: 0), weightGradients: checked.address(.topkWeightGradients, rank: 0))
        try enqueueCombine(handle, into: target, sourceWeights: config.layout == .expertMajor ? checked.address(.topkWeights, rank: 0) : 0,
                           slot: slot, direction: direction, options: options)
    }

    /// That a stacked argument is slot `slot`'s own `buffer` (the peers write or read it there),
    /// or not given where not `required`; int32 where it holds ids.
    private func requireSlotBuffer(_ given: StackedTensor?, _ buffer: TensorRef?, _ field: String, slot: Int, required: Bool = false) throws(EPError) {
        guard let given else {
            guard required, let buffer else { return }
            throw .invalidArgument(field: field, value: "NULL", requirement: "must be slot \(slot)'s own buffer (\(address(buffer)))")
        }
        guard let buffer, given.address == address(buffer), given.dtype == buffer.dtype else {
            throw .invalidArgument(
                field: field, value: "\(given.address) (\(given.dtype))",
                requirement: buffer.map { "must be slot \(slot)'s own buffer (\(address($0)), \($0.dtype))\(required ? "" : " or NULL"): the other ranks write and read it there" }
                    ?? "must be NULL: this group's layout has no such buffer")
        }
    }
}
