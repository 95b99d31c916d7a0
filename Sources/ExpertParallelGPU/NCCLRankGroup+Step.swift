import ExpertParallel
import ExpertParallelCUDA

extension NCCLRankGroup {
    var location: MemoryLocation { .device(device.ordinal) }

    /// The shared buffers of slot 0 that dispatch writes, as the outputs of this rank.
    public var dispatchOutput: DispatchOutput { slots[0].dispatchOutput }

    /// `handle`'s step: this rank's routing, `[B, K]` int32 or int64 on this rank's device (an
    /// array of one, as every `StepGroup` call takes one tensor per local rank).
    public func update(_ handle: GPUStepHandle, topkIdx: [TensorRef], options: CallOptions = CallOptions()) throws(EPError) {
        try engine.update(handle, topkIdx: topkIdx, options: options)
    }

    /// Sends this rank's rows of `handle`'s step into their slots on every rank. `outputs` names
    /// the buffer slot: it must be `[slots[s].dispatchOutput]`; this rank's received rows land
    /// there once every peer's rows have arrived (the call waits for them on the GPU), and the
    /// step's combine reads slot s's expert outputs.
    public func dispatch(
        _ handle: GPUStepHandle, _ inputs: [DispatchInput], into outputs: [DispatchOutput], direction: PassDirection = .forward,
        options: CallOptions = CallOptions()
    ) throws(EPError) {
        try engine.checkLocalCount(outputs.count, "outputs")
        guard let slot = slots.firstIndex(where: { $0.receivedTokens.address == outputs[0].tokens.address }) else {
            throw .invalidArgument(
                field: "outputs[0].tokens", value: "\(address(outputs[0].tokens))",
                requirement: "must be the receive buffer of one of this rank's \(bufferSlots) buffer slots (slots[s].dispatchOutput): the other ranks write it")
        }
        try dispatch(handle, inputs, slot: slot, counts: outputs[0], options: options)
    }

    /// Sends this rank's rows of `handle`'s step into buffer slot `slot` on every rank; the
    /// per-expert counts go to `counts.expertCounts` / `expertSourceCounts` when given.
    public func dispatch(
        _ handle: GPUStepHandle, _ inputs: [DispatchInput], slot: Int, counts: DispatchOutput? = nil, options: CallOptions = CallOptions()
    ) throws(EPError) {
        try engine.checkNothingPending()
        let step = try handle.currentStep()
        try engine.checkLocalCount(inputs.count, "inputs")
        guard slot >= 0, slot < bufferSlots else {
            throw .invalidArgument(field: "slot", value: "\(slot)", requirement: "must be in 0..<\(bufferSlots)")
        }
        let input = inputs[0]
        var output = slots[slot].dispatchOutput
        output.expertCounts = counts?.expertCounts
        output.expertSourceCounts = counts?.expertSourceCounts
        try engine.shapes.validateDispatch(input, output, tokens: step.routing[0].tokens, location: location)
        try routingBytes(step).refuseOverlaps(rank: 0, outputs: CallShapes.dispatchOutputs) { CallShapes.dispatchArgument(input, output, $0) }
        try requireAligned(input.tokens, "input.tokens", 8)
        try requireAligned(input.topkWeights, "input.topkWeights", 4)
        try requireAligned(input.scales, "input.scales", 4)
        try enqueueDispatch(handle, SendSide(input, counts: output), slot: slot, update: nil, options: options)
    }

    /// The bytes of this rank's routing of `step`, which no output of the step's calls may share.
    func routingBytes(_ step: GPUStepHandle.Step) -> RoutingBytes {
        let routing = step.routing   // (the closure captures the array alone: its context is the array's storage, no box per call)
        return RoutingBytes(location: location, topK: config.topK, indexBytes: step.indexBytes) { _ in (routing[0].address, routing[0].tokens) }
    }

    /// Enqueues a checked dispatch of this rank's `source` into buffer slot `slot` on every rank
    /// (the slot's received rows, ids, weights and scales: int32 ids); with `update` (this rank's
    /// routing and its index bytes), the step's update first, in the same call.
    func enqueueDispatch(_ handle: GPUStepHandle, _ source: SendSide, slot: Int, update: (RoutingRows, Int)?, options: CallOptions) throws(EPError) {
        // Local functions, not closures: passed as non-escaping arguments they need no heap context.
        func sources(_: Int) -> SendSide { source }
        func received(_ r: Int) -> ReceiveBuffers {
            ReceiveBuffers(rows: peers[r].received(slot).rawValue, indices: peers[r].receivedIndices(slot).rawValue,
                           weights: peers[r].receivedWeights(slot).rawValue, scales: peers[r].receivedScales(slot).rawValue)
        }
        let vectorBytes = engine.vectorBytes(CollectionOfOne(source.tokens), EmptyCollection())
        if let (routing, indexBytes) = update {
            try engine.updateAndDispatch(handle, routing: [routing], indexBytes: indexBytes, sources: sources, received: received,
                                         receivedIndexBytes: 4, vectorBytes: vectorBytes, options: options)
        } else {
            try engine.dispatch(handle, sources: sources, received: received, receivedIndexBytes: 4, vectorBytes: vectorBytes, options: options)
        }
        recordDispatch(handle, slot: slot)
    }

    /// Pulls this rank's rows of `handle`'s step back from every rank's expert outputs (of the
    /// slot its dispatch used) and reduces them (the fixed order of docs/architecture.md, "Order
    /// and arithmetic").
    /// `inputs[0].expertOutputs` must be this rank's `slots[s].expertOutputs`; HT expert-major
    /// forward takes `slots[s].receivedWeights` as `topkWeights`, HT backward takes
    /// `slots[s].weightGradients`: the buffers the other ranks read.
    public func combine(
        _ handle: GPUStepHandle, _ inputs: [CombineInput], into outputs: [CombineOutput], direction: PassDirection = .forward,
        options: CallOptions = CallOptions()
    ) throws(EPError) {
        try engine.checkLocalCount(inputs.count, "inputs")
        try engine.checkLocalCount(outputs.count, "outputs")
        let slot = try checkCombine(handle, inputs[0], outputs[0], direction: direction)
        try enqueueCombine(handle, inputs[0], outputs[0], slot: slot, direction: direction, options: options)
    }

    /// A combine's checks (its inputs in the buffers of the slot its step's dispatch used): that
    /// slot. Nothing is enqueued.
    func checkCombine(_ handle: GPUStepHandle, _ input: CombineInput, _ output: CombineOutput, direction: PassDirection) throws(EPError) -> Int {
        try engine.checkNothingPending()
        let step = try handle.currentStep()
        _ = try handle.dispatchedStep()
        let slot = try slotOfDispatch(handle)
        let buffers = slots[slot]
        try engine.shapes.validateCombine(input, output, tokens: step.routing[0].tokens, direction: direction, location: location)
        try routingBytes(step).refuseOverlaps(rank: 0, outputs: CallShapes.combineOutputs) { CallShapes.combineArgument(input, output, $0) }
        try requireShared(input.expertOutputs, buffers.expertOutputs, "input.expertOutputs", "slots[\(slot)].expertOutputs")
        try requireAligned(output.tokens, "output.tokens", 8)
        try requireAligned(input.topkWeights, "input.topkWeights", 4)
        try requireAligned(output.topkWeightGradients, "output.topkWeightGradients", 4)
        if config.isExpertMajorHT, direction == .forward, let weights = buffers.receivedWeights {
            try requireShared(input.topkWeights, weights, "input.topkWeights", "slots[\(slot)].receivedWeights")
        }
        if config.algorithm == .highThroughput, direction == .backward, let gradients = buffers.weightGradients {
            try requireShared(input.weightGradients, gradients, "input.weightGradients", "slots[\(slot)].weightGradients")
        }
        return slot
    }

    /// Enqueues a combine that `checkCombine` passed.
    func enqueueCombine(
        _ handle: GPUStepHandle, _ input: CombineInput, _ output: CombineOutput, slot: Int, direction: PassDirection, options: CallOptions
    ) throws(EPError) {
        try enqueueCombine(handle, into: CombineTarget(output), sourceWeights: input.topkWeights.map(address) ?? 0, slot: slot,
                           direction: direction, options: options)
    }

    /// Enqueues a checked combine of slot `slot`'s expert outputs into `target`; `sourceWeights`:
    /// LL expert-major's `[B, K]` weights of this rank (0 for the other layouts).
    func enqueueCombine(
        _ handle: GPUStepHandle, into target: CombineTarget, sourceWeights: UInt64, slot: Int, direction: PassDirection, options: CallOptions
    ) throws(EPError) {
        let layout = config.layout, rank = self.rank
        try engine.combine(
            handle, into: { _ in target },
            experts: { [peers] r in
                // LL expert-major weighs with the source's own [B, K]; HT expert-major with each
                // destination's per-slot weights.
                let weights = layout == .expertMajor ? (r == rank ? sourceWeights : 0) : peers[r].receivedWeights(slot).rawValue
                return ExpertSide(rows: peers[r].expertOutputs(slot).rawValue, weights: weights, weightGradients: peers[r].weightGradients(slot).rawValue)
            },
            direction: direction, vectorBytes: engine.vectorBytes(CollectionOfOne(target.tokens), EmptyCollection()), options: options)
    }

    /// Enqueues the second half of the last send-only dispatch or combine.
    public func complete(options: CallOptions) throws(EPError) { try engine.complete(options: options) }

    // MARK: the calls on the group's default handle (buffer slot 0)

    /// `update` on the group's default handle.
    public func update(topkIdx: TensorRef, stream: CUDAStream? = nil) throws(EPError) {
        try update(implicitHandle, topkIdx: [topkIdx], options: .init(stream))
    }

    /// `dispatch` of the default handle's step into slot 0 (`dispatchOutput`).
    public func dispatch(_ input: DispatchInput, phase: CallPhase = .whole, stream: CUDAStream? = nil) throws(EPError) {
        try dispatch(implicitHandle, [input], slot: 0, options: .init(stream, phase: phase))
    }

    /// `combine` of the default handle's step.
    public func combine(
        _ input: CombineInput, into output: CombineOutput, direction: PassDirection = .forward, phase: CallPhase = .whole,
        stream: CUDAStream? = nil
    ) throws(EPError) {
        try combine(implicitHandle, [input], into: [output], direction: direction, options: .init(stream, phase: phase))
    }

    /// Enqueues the second half of the last send-only dispatch or combine.
    public func complete(stream: CUDAStream? = nil) throws(EPError) { try engine.complete(options: .init(stream)) }

    // MARK: status

    /// Synchronises the device, then throws the error this rank recorded since the last check.
    public func checkStatus() throws(EPError) { try engine.checkStatus() }

    /// What this rank received in the default handle's last step (synchronises).
    public func layoutInfo() throws(EPError) -> LayoutInfo { try engine.layoutInfo(implicitHandle, rank: rank) }

    /// What this rank received in `handle`'s step (synchronises); `rank` must be this rank.
    public func layoutInfo(_ handle: GPUStepHandle, rank: Int) throws(EPError) -> LayoutInfo { try engine.layoutInfo(handle, rank: rank) }

    /// This rank's view of the active ranks: a peer that missed the timeout is removed (synchronises).
    public var activeRanks: RankMask { get throws(EPError) { try engine.activeRanks } }

    /// Not offered yet: masking a rank of another process needs every rank to agree.
    public func deactivate(rank: Int) throws(EPError) {
        throw .wrongOrder("an NCCL rank group does not offer deactivate yet; a rank that times out is masked by its peers")
    }

    /// Not offered yet: the ranks would have to clear their workspaces together (a bounded barrier).
    public func clean(ranks: RankMask) throws(EPError) {
        throw .wrongOrder("an NCCL rank group does not offer clean yet")
    }

    // MARK: helpers

    func requireShared(_ given: TensorRef?, _ shared: TensorRef, _ field: String, _ name: String) throws(EPError) {
        guard let given, given.address == shared.address else {
            throw .invalidArgument(
                field: field, value: given.map { "\(address($0))" } ?? "nil",
                requirement: "must be this rank's shared `\(name)` buffer (\(address(shared))): the other ranks read it")
        }
    }
}
