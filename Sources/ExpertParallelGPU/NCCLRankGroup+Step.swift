import ExpertParallel
import ExpertParallelCUDA

// EP_SYNC_* bits of ep_step.cuh. A rank of its own process always meets its peers through flags.
private let syncSignal: UInt64 = 1, syncWait: UInt64 = 2, syncNoData: UInt64 = 4, syncDone: UInt64 = 8

extension NCCLRankGroup {
    var location: MemoryLocation { .device(device.ordinal) }

    /// The shared buffers dispatch writes, as the outputs of this rank.
    public var dispatchOutput: DispatchOutput {
        DispatchOutput(tokens: receivedTokens, topkIdx: receivedIndices, topkWeights: receivedWeights)
    }

    /// This step's routing, `[B, K]` int32 or int64 on this rank's device.
    public func update(topkIdx: TensorRef, stream: CUDAStream? = nil) throws(EPError) {
        guard pending == nil else { throw .wrongOrder("complete() the pending send-only call first") }
        step = nil   // a rejected update voids the step (see VirtualGPUGroup.update)
        guard topkIdx.shape.count == 2, topkIdx.shape[1] == config.topK, topkIdx.shape[0] <= config.maxTokensPerRank else {
            throw .invalidArgument(
                field: "topkIdx.shape", value: "\(topkIdx.shape)",
                requirement: "must be [tokens ≤ maxTokensPerRank (\(config.maxTokensPerRank)), topK = \(config.topK)]")
        }
        try TensorCheck.require(topkIdx, "topkIdx", dtypes: [.i32, .i64], shape: topkIdx.shape, location: location)
        try requireAligned(topkIdx, "topkIdx", topkIdx.dtype.byteSize)
        let k = try kernels(.init(indexBytes: topkIdx.dtype.byteSize, receivedIndexBytes: 4, vectorBytes: 16))
        try launch(k.update, threads: config.algorithm == .lowLatency ? 256 : 512, blocks: 1, sync: 0, weighted: false,
                   stream: stream) { r, w in
            if r == rank {
                w[1] = address(topkIdx)
                w[8] = UInt64(topkIdx.shape[0])
            }
        }
        step = (topkIdx, topkIdx.dtype.byteSize)
    }

    /// Sends this rank's rows into their slots on every rank; this rank's received rows land in
    /// `dispatchOutput` once every peer's rows have arrived (the call waits for them on the GPU).
    public func dispatch(_ input: DispatchInput, phase: CallPhase = .whole, stream: CUDAStream? = nil) throws(EPError) {
        let step = try currentStep()
        try config.validateDispatch(input, dispatchOutput, tokens: step.routing.shape[0], location: location)
        try requireAligned(input.tokens, "input.tokens", 8)
        try requireAligned(input.topkWeights, "input.topkWeights", 4)
        let aligned = config.rowBytes % 16 == 0 && address(input.tokens) % 16 == 0
        let k = try kernels(.init(indexBytes: step.indexBytes, receivedIndexBytes: 4, vectorBytes: aligned ? 16 : 8))
        let enqueue = { [self] (sync: UInt64, blocks: Int, stream: CUDAStream?) throws(EPError) in
            try launch(k.dispatch, threads: VirtualGPUGroup.threadsPerBlock, blocks: blocks, sync: sync, weighted: false, stream: stream) { r, w in
                if r == rank {
                    w[0] = address(input.tokens)
                    w[1] = address(step.routing)
                    w[2] = input.topkWeights.map(address) ?? 0
                    w[8] = UInt64(step.routing.shape[0])
                }
                w[3] = peers[r].received.rawValue
                w[4] = peers[r].receivedIndices.rawValue
                w[5] = peers[r].receivedWeights.rawValue
            }
        }
        switch phase {
        case .whole: try enqueue(syncSignal | syncWait, blocks, stream)
        case .sendOnly:
            try enqueue(syncSignal, blocks, stream)
            pending = PendingCall(name: "dispatch") { stream throws(EPError) in try enqueue(syncWait | syncNoData, 1, stream) }
        }
    }

    /// Pulls this rank's rows back from every rank's `expertOutputs` and reduces them (the
    /// fixed order of DESIGN.md). `input.expertOutputs` must be this rank's `expertOutputs`
    /// buffer; HT expert-major forward takes `receivedWeights` as `topkWeights`, HT backward
    /// takes `weightGradients`: the buffers the other ranks read.
    public func combine(
        _ input: CombineInput, into output: CombineOutput, direction: PassDirection = .forward, phase: CallPhase = .whole,
        stream: CUDAStream? = nil
    ) throws(EPError) {
        let step = try currentStep()
        try config.validateCombine(input, output, tokens: step.routing.shape[0], direction: direction, location: location)
        try requireShared(input.expertOutputs, expertOutputs, "input.expertOutputs", "expertOutputs")
        try requireAligned(output.tokens, "output.tokens", 8)
        try requireAligned(input.topkWeights, "input.topkWeights", 4)
        try requireAligned(output.topkWeightGradients, "output.topkWeightGradients", 4)
        if config.isExpertMajorHT, direction == .forward, let weights = receivedWeights {
            try requireShared(input.topkWeights, weights, "input.topkWeights", "receivedWeights")
        }
        if config.algorithm == .highThroughput, direction == .backward, let gradients = weightGradients {
            try requireShared(input.weightGradients, gradients, "input.weightGradients", "weightGradients")
        }
        let aligned = config.rowBytes % 16 == 0 && address(output.tokens) % 16 == 0
        let k = try kernels(.init(indexBytes: step.indexBytes, receivedIndexBytes: 4, vectorBytes: aligned ? 16 : 8))
        let weighted = direction == .forward && (config.layout == .expertMajor || config.isExpertMajorHT)
        let enqueue = { [self] (sync: UInt64, blocks: Int, stream: CUDAStream?) throws(EPError) in
            try launch(k.combine, threads: VirtualGPUGroup.threadsPerBlock, blocks: blocks, sync: sync, weighted: weighted, stream: stream) { r, w in
                if r == rank {
                    w[1] = address(step.routing)
                    w[6] = address(output.tokens)
                    w[8] = UInt64(step.routing.shape[0])
                    w[10] = output.topkWeightGradients.map(address) ?? 0
                }
                // LL expert-major weighs with the source's own [B, K]; HT expert-major with
                // each destination's per-slot weights.
                w[2] = config.layout == .expertMajor ? (r == rank ? input.topkWeights.map(address) ?? 0 : 0) : peers[r].receivedWeights.rawValue
                w[3] = peers[r].expertOutputs.rawValue
                w[9] = peers[r].weightGradients.rawValue
            }
        }
        switch phase {
        case .whole: try enqueue(syncSignal | syncWait | syncDone, blocks, stream)
        case .sendOnly:
            try enqueue(syncSignal | syncNoData, 1, stream)
            pending = PendingCall(name: "combine") { [blocks] stream throws(EPError) in try enqueue(syncWait | syncDone, blocks, stream) }
        }
    }

    /// Enqueues the second half of the last send-only dispatch or combine.
    public func complete(stream: CUDAStream? = nil) throws(EPError) {
        guard let call = pending else { throw .wrongOrder("complete() needs a dispatch or combine issued with phase .sendOnly") }
        pending = nil
        try call.enqueue(stream)
    }

    /// Synchronises the device, then throws the error this rank recorded in the last step.
    public func checkStatus() throws(EPError) {
        try gpu { try device.driver.synchronizeContext() }
        let words = try gpu { try device.driver.read(UInt32.self, from: peers[rank].workspace.advanced(by: StepWorkspace.status * 4), count: 4) }
        if let error = DeviceStatus.error(words, rank: rank, config: config) { throw error }
    }

    /// What this rank received in the last step (synchronises).
    public func layoutInfo() throws(EPError) -> LayoutInfo {
        try gpu { try device.driver.synchronizeContext() }
        let words = try gpu {
            try device.driver.read(UInt32.self, from: peers[rank].workspace.advanced(by: workspace.layout * 4), count: workspace.layoutWords)
        }.map { Int($0) }
        return workspace.layoutInfo(words, config: config)
    }

    /// This rank's view of the active ranks: a peer that missed the timeout is removed (synchronises).
    public var activeRanks: RankMask {
        get throws(EPError) {
            try gpu { try device.driver.synchronizeContext() }
            return RankMask(bits: try gpu { try device.driver.read(UInt64.self, from: mask, count: 1)[0] })
        }
    }

    // MARK: helpers

    func currentStep() throws(EPError) -> (routing: TensorRef, indexBytes: Int) {
        if let pending { throw .wrongOrder("complete() the pending send-only \(pending.name) first") }
        guard let step else { throw .wrongOrder("dispatch and combine need update with this step's topkIdx first") }
        return step
    }

    func requireShared(_ given: TensorRef?, _ shared: TensorRef, _ field: String, _ name: String) throws(EPError) {
        guard let given, given.address == shared.address else {
            throw .invalidArgument(
                field: field, value: given.map { "\(address($0))" } ?? "nil",
                requirement: "must be this rank's shared `\(name)` buffer (\(address(shared))): the other ranks read it")
        }
    }

    func kernels(_ variant: StepKernels.Variant) throws(EPError) -> StepKernels {
        if let k = kernelCache[variant] { return k }
        try device.makeCurrent()
        let k = try StepKernels(device: device, config: config, variant: variant, tuning: tuning)
        kernelCache[variant] = k
        return k
    }

    /// Fills `EpArgs` (every rank's words: `fill` sets the buffers; the workspace is the rank's
    /// shared one) and launches one grid of this rank's blocks.
    func launch(
        _ function: CUDAFunction, threads: Int, blocks: Int, sync: UInt64, weighted: Bool, stream callerStream: CUDAStream?,
        rank fill: (Int, UnsafeMutableBufferPointer<UInt64>) -> Void
    ) throws(EPError) {
        let pieces = StepArguments.rowPieces(tuning, blocks: blocks, tokens: step?.routing.shape[0] ?? 1, rowBytes: config.rowBytes)
        args.fill(workspace: { self.peers[$0].workspace }, mask: mask, timeout: config.timeout, firstRank: rank, sync: sync,
                  weighted: weighted, pieces: pieces, rank: fill)
        try device.makeCurrent()
        try gpu { try args.launch(function, on: device, grid: .init(x: UInt32(blocks), y: 1), threads: threads, stream: callerStream ?? stream) }
    }
}
