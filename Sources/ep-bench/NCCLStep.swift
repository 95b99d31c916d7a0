import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU

/// One NCCL rank's inputs of a bench case on its GPU, and the step that moves them with
/// identity experts: update, dispatch, the received rows copied to the expert-output buffer,
/// combine. The benchmark times it; the failure drill repeats it after a rank has died.
struct NCCLStep {
    let group: NCCLRankGroup
    let x: DeviceTensor, weights: DeviceTensor, routing: DeviceTensor, combined: DeviceTensor

    init(group: NCCLRankGroup, data: BenchData, rank: Int) throws {
        self.group = group
        let device = group.device
        func upload(_ host: HostTensor) throws -> DeviceTensor { try DeviceTensor(uploading: host, on: device) }
        x = try upload(data.tokens[rank])
        weights = try upload(data.weights[rank])
        routing = try upload(data.topkIdx[rank])
        combined = try DeviceTensor(group.config.elementType, data.tokens[rank].shape, on: device)
    }

    /// Enqueues one step on the group's stream. `mark(i)` runs at the phase boundaries: 0 before
    /// the update, 1 after it, 2 after dispatch, 3 after the expert copy, 4 after combine.
    func enqueue(mark: (Int) throws -> Void = { _ in }) throws {
        try mark(0)
        try group.update(topkIdx: routing.ref)
        try mark(1)
        try group.dispatch(DispatchInput(tokens: x.ref, topkWeights: weights.ref))
        try mark(2)
        try copyAndCombine(mark: mark)
    }

    /// The same step with the update and the dispatch in one call (the stacked dispatch, what the
    /// Python package calls: one launch where the group fuses them). Marks 0 before it, 2 after
    /// it, then as `enqueue`.
    func enqueueUpdatingInDispatch(mark: (Int) throws -> Void = { _ in }) throws {
        try mark(0)
        let call = StackedDispatch(tokens: routing.shape[0], topkIdx: StackedTensor(routing.ref), inputs: StackedTensor(x.ref),
                                   topkWeights: StackedTensor(weights.ref), received: StackedTensor(group.receivedTokens))
        try group.dispatch(group.implicitHandle, stacked: call)
        try mark(2)
        try copyAndCombine(mark: mark)
    }

    /// The received rows copied to the expert outputs (mark 3 after), then combine (mark 4 after).
    private func copyAndCombine(mark: (Int) throws -> Void) throws {
        let config = group.config
        let received = group.receivedTokens, experts = group.expertOutputs
        try group.device.driver.copy(
            from: DevicePointer(rawValue: UInt64(UInt(bitPattern: received.address))),
            to: DevicePointer(rawValue: UInt64(UInt(bitPattern: experts.address))),
            byteCount: received.byteCount, stream: group.stream)
        try mark(3)
        let combineIn = CombineInput(
            expertOutputs: experts,
            topkWeights: config.layout == .expertMajor ? weights.ref : config.isExpertMajorHT ? group.receivedWeights : nil)
        try group.combine(combineIn, into: CombineOutput(tokens: combined.ref))
        try mark(4)
    }

    /// This rank's combined rows (synchronises).
    func combinedRows() throws -> HostTensor {
        let host = HostTensor(combined.dtype, combined.shape)
        try combined.download(into: host)
        return host
    }
}
