import ExpertParallel
import ExpertParallelCUDA

extension VirtualGPUGroup {
    var location: MemoryLocation { .device(device.ordinal) }

    /// `handle`'s step: every rank's routing, `topkIdx[r]` `[B_r, K]` int32 or int64 on the
    /// device. Counts, exchanges counts between ranks and fixes every slot, all on the device.
    public func update(_ handle: GPUStepHandle, topkIdx: [TensorRef], options: CallOptions = CallOptions()) throws(EPError) {
        try engine.update(handle, topkIdx: topkIdx, options: options)
    }

    /// Sends every rank's rows of `handle`'s step straight into their slots in the destination
    /// ranks' `outputs`. With `phase: .sendOnly` the rows are sent but nobody waits for them:
    /// `complete()` does. A backward dispatch is the same call (`direction` is for symmetry).
    public func dispatch(
        _ handle: GPUStepHandle, _ inputs: [DispatchInput], into outputs: [DispatchOutput], direction: PassDirection = .forward,
        options: CallOptions = CallOptions()
    ) throws(EPError) {
        try engine.checkNothingPending()
        let step = try handle.currentStep()
        try checkDispatch(inputs, outputs, routing: step.routing, indexBytes: step.indexBytes)
        try engine.dispatch(handle, sources: { SendSide(inputs[$0], counts: outputs[$0]) }, received: receiveBuffers(outputs),
                            receivedIndexBytes: outputs[0].topkIdx?.dtype.byteSize ?? 4, vectorBytes: vectorBytes(inputs, outputs), options: options)
    }

    /// `handle`'s update with `topkIdx` and its dispatch, in one call: where the kernels allow
    /// (LL, one launch for every rank, `tuning.fusesUpdate`) one launch does both, else the two
    /// launches of `update` and `dispatch`; the same slots and bits either way. Every argument
    /// is checked first: a rejected call runs nothing and leaves the step as it was.
    public func dispatch(
        _ handle: GPUStepHandle, topkIdx: [TensorRef], _ inputs: [DispatchInput], into outputs: [DispatchOutput],
        options: CallOptions = CallOptions()
    ) throws(EPError) {
        try engine.checkNothingPending()
        let routing = try engine.checkedRouting(topkIdx)
        try checkDispatch(inputs, outputs, routing: routing, indexBytes: topkIdx[0].dtype.byteSize)
        try engine.updateAndDispatch(
            handle, routing: routing, indexBytes: topkIdx[0].dtype.byteSize, sources: { SendSide(inputs[$0], counts: outputs[$0]) },
            received: receiveBuffers(outputs), receivedIndexBytes: outputs[0].topkIdx?.dtype.byteSize ?? 4,
            vectorBytes: vectorBytes(inputs, outputs), options: options)
    }

    private func receiveBuffers(_ outputs: [DispatchOutput]) -> (Int) -> ReceiveBuffers {
        { r in ReceiveBuffers(rows: address(outputs[r].tokens), indices: outputs[r].topkIdx.map(address) ?? 0,
                              weights: outputs[r].topkWeights.map(address) ?? 0, scales: outputs[r].scales.map(address) ?? 0) }
    }

    private func vectorBytes(_ inputs: [DispatchInput], _ outputs: [DispatchOutput]) -> Int {
        engine.vectorBytes(inputs.lazy.map { address($0.tokens) }, outputs.lazy.map { address($0.tokens) })
    }

    /// Runs the core's checks of rank `r`'s call, which name its `input` and `output`: here entry
    /// `r` of the group's `inputs` and `outputs`, as the group's own checks name them (`inputs[1].tokens`).
    private static func checkingRank(_ r: Int, _ check: () throws(EPError) -> Void) throws(EPError) {
        do {
            try check()
        } catch {
            throw error.renamingField([("input", "inputs[\(r)]"), ("output", "outputs[\(r)]")])
        }
    }

    /// A dispatch's per-rank tensors against the step's routing (`routing[r].tokens` rows each).
    private func checkDispatch(_ inputs: [DispatchInput], _ outputs: [DispatchOutput], routing: [RoutingRows], indexBytes: Int) throws(EPError) {
        try engine.checkLocalCount(inputs.count, "inputs")
        try engine.checkLocalCount(outputs.count, "outputs")
        for r in 0..<config.ranks {
            try Self.checkingRank(r) { () throws(EPError) in try engine.shapes.validateDispatch(inputs[r], outputs[r], tokens: routing[r].tokens, location: location) }
            try requireAligned(inputs[r].tokens, "inputs[\(r)].tokens", 8)
            try requireAligned(outputs[r].tokens, "outputs[\(r)].tokens", 8)
            try requireAligned(inputs[r].topkWeights, "inputs[\(r)].topkWeights", 4)
            try requireAligned(outputs[r].topkIdx, "outputs[\(r)].topkIdx", outputs[r].topkIdx?.dtype.byteSize ?? 4)
            try requireAligned(outputs[r].topkWeights, "outputs[\(r)].topkWeights", 4)
            try requireAligned(inputs[r].scales, "inputs[\(r)].scales", 4)
            try requireAligned(outputs[r].scales, "outputs[\(r)].scales", 4)
            // One kernel writes every rank's received ids: they must share a width.
            if let idx = outputs[r].topkIdx, let first = outputs[0].topkIdx, idx.dtype != first.dtype {
                throw .invalidArgument(field: "outputs[\(r)].topkIdx.dtype", value: "\(idx.dtype)", requirement: "must match rank 0's (\(first.dtype))")
            }
        }
        // One launch runs every rank: one's writes would race another's reads (and the routing's, read again until the last combine).
        try engine.shapes.refuseOverlaps(inputs, outputs, ranks: 0..<config.ranks, routing: routingBytes(routing, indexBytes: indexBytes))
    }

    /// Every rank pulls its rows of `handle`'s step back and reduces them in the fixed order of
    /// docs/architecture.md ("Order and arithmetic"). With `phase: .sendOnly` each rank only
    /// announces that its expert outputs may be read; `complete()` pulls and reduces.
    public func combine(
        _ handle: GPUStepHandle, _ inputs: [CombineInput], into outputs: [CombineOutput], direction: PassDirection = .forward,
        options: CallOptions = CallOptions()
    ) throws(EPError) {
        try engine.checkNothingPending()
        let step = try handle.dispatchedStep()
        try engine.checkLocalCount(inputs.count, "inputs")
        try engine.checkLocalCount(outputs.count, "outputs")
        for r in 0..<config.ranks {
            try Self.checkingRank(r) { () throws(EPError) in try engine.shapes.validateCombine(inputs[r], outputs[r], tokens: step.routing[r].tokens, direction: direction, location: location) }
            try requireAligned(inputs[r].expertOutputs, "inputs[\(r)].expertOutputs", 8)
            try requireAligned(outputs[r].tokens, "outputs[\(r)].tokens", 8)
            try requireAligned(inputs[r].topkWeights, "inputs[\(r)].topkWeights", 4)
            try requireAligned(inputs[r].weightGradients, "inputs[\(r)].weightGradients", 4)
            try requireAligned(outputs[r].topkWeightGradients, "outputs[\(r)].topkWeightGradients", 4)
        }
        try engine.shapes.refuseOverlaps(inputs, outputs, ranks: 0..<config.ranks, routing: routingBytes(step.routing, indexBytes: step.indexBytes))
        try engine.combine(
            handle, into: { CombineTarget(outputs[$0]) },
            experts: { r in ExpertSide(rows: address(inputs[r].expertOutputs), weights: inputs[r].topkWeights.map(address) ?? 0,
                                       weightGradients: inputs[r].weightGradients.map(address) ?? 0) },
            direction: direction,
            vectorBytes: engine.vectorBytes(inputs.lazy.map { address($0.expertOutputs) }, outputs.lazy.map { address($0.tokens) }), options: options)
    }

    /// The bytes of each rank's routing of a step, which no output of its calls may share.
    func routingBytes(_ routing: [RoutingRows], indexBytes: Int) -> RoutingBytes {
        RoutingBytes(location: location, topK: config.topK, indexBytes: indexBytes) { r in (routing[r].address, routing[r].tokens) }
    }

    /// Whether `dispatch(_:topkIdx:_:into:)` runs update and dispatch as one launch (LL, the
    /// kernel fits, `tuning.fusesUpdate`) in one launch covering every rank.
    public var fusesUpdate: Bool { engine.canFuseUpdate(CallOptions()) }

    /// Enqueues the second half of the last send-only dispatch or combine.
    public func complete(options: CallOptions) throws(EPError) { try engine.complete(options: options) }

    // MARK: the calls on the group's default handle

    /// `update` on the group's default handle.
    public func update(topkIdx: [TensorRef], stream: CUDAStream? = nil, mode: LaunchMode = .single) throws(EPError) {
        try update(implicitHandle, topkIdx: topkIdx, options: .init(stream, mode: mode))
    }

    /// `dispatch` of the default handle's step.
    public func dispatch(
        _ inputs: [DispatchInput], into outputs: [DispatchOutput], phase: CallPhase = .whole,
        stream: CUDAStream? = nil, mode: LaunchMode = .single
    ) throws(EPError) {
        try dispatch(implicitHandle, inputs, into: outputs, options: .init(stream, phase: phase, mode: mode))
    }

    /// `update` and `dispatch` of the default handle's step in one call (one launch where the group fuses them).
    public func dispatch(
        topkIdx: [TensorRef], _ inputs: [DispatchInput], into outputs: [DispatchOutput], phase: CallPhase = .whole,
        stream: CUDAStream? = nil, mode: LaunchMode = .single
    ) throws(EPError) {
        try dispatch(implicitHandle, topkIdx: topkIdx, inputs, into: outputs, options: .init(stream, phase: phase, mode: mode))
    }

    /// `combine` of the default handle's step.
    public func combine(
        _ inputs: [CombineInput], into outputs: [CombineOutput], direction: PassDirection = .forward,
        phase: CallPhase = .whole, stream: CUDAStream? = nil, mode: LaunchMode = .single
    ) throws(EPError) {
        try combine(implicitHandle, inputs, into: outputs, direction: direction, options: .init(stream, phase: phase, mode: mode))
    }

    /// Enqueues the second half of the last send-only dispatch or combine.
    public func complete(stream: CUDAStream? = nil) throws(EPError) { try engine.complete(options: .init(stream)) }
}

extension CallOptions {
    /// Options for a call on `stream` (nil: the group's own). A stream whose handle is NULL is
    /// CUDA's legacy default stream, as in CUDA's own calls (and the C ABI's): it is named
    /// explicitly (`CU_STREAM_LEGACY`), since a nil `CallOptions.stream` means the group's stream.
    public init(_ stream: CUDAStream?, phase: CallPhase = .whole, mode: LaunchMode = .single) {
        self.init(stream: stream.map { $0.rawValue ?? CallOptions.legacyStream }, phase: phase, launch: mode)
    }

    /// `CU_STREAM_LEGACY`: the legacy default stream, named explicitly.
    static var legacyStream: OpaquePointer { OpaquePointer(bitPattern: 1)! }
}
