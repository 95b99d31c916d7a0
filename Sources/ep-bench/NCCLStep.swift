import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU

/// One NCCL rank's inputs of a bench case on its GPU, and the step that moves them with
/// identity experts: update, dispatch, the received rows copied to the expert-output buffer,
/// combine. The benchmark times it; the failure drill repeats it after a rank has died.
///
/// FP8 (`fp8` given): the dispatch sends the element-type rows to be quantised, or (pass-through)
/// the e4m3 rows and scales quantised once before; the expert outputs are the rows a plain
/// dispatch of the same step delivers (combine runs in the element type), copied in where the
/// received rows are otherwise, as the virtual ranks' benchmark does.
struct NCCLStep {
    let group: NCCLRankGroup
    let x: DeviceTensor, weights: DeviceTensor, routing: DeviceTensor, combined: DeviceTensor
    /// FP8 pass-through: the e4m3 rows' scales.
    let scales: DeviceTensor?
    /// FP8: the plain rows combine reads (the experts' outputs); nil: the received rows.
    let expertRows: DeviceTensor?
    /// FP8: the oracle's plain dispatch and the check of the received e4m3 rows and scales.
    let fp8: FP8HostData?

    init(group: NCCLRankGroup, data: BenchData, rank: Int) throws {
        self.group = group
        let device = group.device
        func upload(_ host: HostTensor) throws -> DeviceTensor { try DeviceTensor(uploading: host, on: device) }
        fp8 = try group.config.fp8.map { _ in try FP8HostData(config: group.config, data: data) }
        x = try upload(fp8?.sourceCodes?[rank] ?? data.tokens[rank])
        scales = try fp8?.sourceScales.map { try upload($0[rank]) }
        expertRows = try fp8.map { try upload($0.plainRows[rank]) }
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
        try group.dispatch(DispatchInput(tokens: x.ref, topkWeights: weights.ref, scales: scales?.ref))
        try mark(2)
        try copyAndCombine(mark: mark)
    }

    /// The same step with the update and the dispatch in one call (the stacked dispatch, what the
    /// Python package calls: one launch where the group fuses them). Marks 0 before it, 2 after
    /// it, then as `enqueue`.
    func enqueueUpdatingInDispatch(mark: (Int) throws -> Void = { _ in }) throws {
        try mark(0)
        let call = StackedDispatch(tokens: routing.shape[0], topkIdx: StackedTensor(routing.ref), inputs: StackedTensor(x.ref),
                                   topkWeights: StackedTensor(weights.ref), scales: scales.map { StackedTensor($0.ref) },
                                   received: StackedTensor(group.receivedTokens))
        try group.dispatch(group.implicitHandle, stacked: call)
        try mark(2)
        try copyAndCombine(mark: mark)
    }

    /// The received rows (FP8: the plain rows) copied to the expert outputs (mark 3 after), then
    /// combine (mark 4 after).
    private func copyAndCombine(mark: (Int) throws -> Void) throws {
        let config = group.config
        let rows = expertRows?.ref ?? group.receivedTokens, experts = group.expertOutputs
        try group.device.driver.copy(from: rows.devicePointer, to: experts.devicePointer, byteCount: experts.byteCount, stream: group.stream)
        try mark(3)
        let combineIn = CombineInput(
            expertOutputs: experts,
            topkWeights: config.layout == .expertMajor ? weights.ref : config.isExpertMajorHT ? group.receivedWeights : nil)
        try group.combine(combineIn, into: CombineOutput(tokens: combined.ref))
        try mark(4)
    }

    /// This rank's combined rows (synchronises).
    func combinedRows() throws -> HostTensor {
        let host = try HostTensor(combined.dtype, combined.shape)
        try combined.download(into: host)
        return host
    }

    /// FP8: whether every receive slot of this rank holds the quantisation of the plain row there,
    /// codes and scale words (synchronises); true without FP8. The receive buffers must hold this
    /// step's dispatch alone (a slot it leaves unused must not hold an earlier step's row).
    func receivedFP8Matches(rank: Int) throws -> Bool {
        guard let fp8, let scales = group.slots[0].receivedScales else { return true }
        let config = group.config
        let rows = try HostTensor(config.receiveElementType, config.receiveShape), words = try HostTensor(scales.dtype, scales.shape)
        for (buffer, host) in [(group.receivedTokens, rows), (scales, words)] {
            try group.device.driver.copy(from: buffer.devicePointer, to: host.storage, byteCount: host.byteCount, stream: group.stream)
        }
        try group.device.driver.synchronize(group.stream)
        return fp8.validate(rank: rank, config: config, received: rows, scales: words)
    }

    /// Zeroes this rank's receive rows and scale words (slot 0), so that the next dispatch's are
    /// all they hold.
    func clearReceived() throws {
        for buffer in [group.receivedTokens, group.slots[0].receivedScales].compactMap({ $0 }) {
            try group.device.driver.fill(buffer.devicePointer, byte: 0, byteCount: buffer.byteCount, stream: group.stream)
        }
    }
}
