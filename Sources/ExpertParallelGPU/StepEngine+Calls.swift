import ExpertParallel
import ExpertParallelCUDA

/// Where one rank's received rows and routing are (dispatch writes them), and the FP8 rows' scale words.
struct ReceiveBuffers {
    var rows: UInt64 = 0
    var indices: UInt64 = 0
    var weights: UInt64 = 0
    var scales: UInt64 = 0
}

/// Where one local rank's rows to send are (with their routing weights and FP8 scales), and
/// where the dispatch writes its per-expert counts (0: not asked for).
struct SendSide {
    var tokens: UInt64
    var weights: UInt64
    var scales: UInt64
    var counts: UInt64
    var sourceCounts: UInt64
}

extension SendSide {
    /// A per-rank call's tensors (and, where given, the output's count tensors).
    init(_ input: DispatchInput, counts output: DispatchOutput?) {
        self.init(tokens: address(input.tokens), weights: input.topkWeights.map(address) ?? 0, scales: input.scales.map(address) ?? 0,
                  counts: output?.expertCounts.map(address) ?? 0, sourceCounts: output?.expertSourceCounts.map(address) ?? 0)
    }
}

/// Where one local rank's combined rows go (and, backward HT, its weight gradients).
struct CombineTarget {
    var tokens: UInt64
    var weightGradients: UInt64
}

extension CombineTarget {
    /// A per-rank call's output tensors.
    init(_ output: CombineOutput) {
        self.init(tokens: address(output.tokens), weightGradients: output.topkWeightGradients.map(address) ?? 0)
    }
}

/// Where one rank's expert outputs are (combine reads them), with the weights combine applies
/// there (LL expert-major: the source's `[B, K]`; HT expert-major: the per-slot weights) and,
/// in HT's backward pass, the weight gradients per received row or slot.
struct ExpertSide {
    var rows: UInt64 = 0
    var weights: UInt64 = 0
    var weightGradients: UInt64 = 0
}

extension StepEngine {
    /// The step's routing, one `[B, K]` int32 or int64 tensor per local rank: counts, exchanges
    /// counts between ranks and fixes every slot into `handle`, all on the device.
    func update(_ handle: GPUStepHandle, topkIdx: [TensorRef], options: CallOptions) throws(EPError) {
        try checkNothingPending()
        // A rejected update voids the step, as a failed one on the device does: no dispatch may
        // move this step's tokens with an earlier step's routing.
        handle.setStep(nil)
        try enqueueUpdate(handle, routing: checkedRouting(topkIdx), indexBytes: topkIdx[0].dtype.byteSize, options: options)
    }

    /// Every local rank's routing after the update's checks (shape, dtype, device, alignment, one width).
    func checkedRouting(_ topkIdx: [TensorRef]) throws(EPError) -> [RoutingRows] {
        try checkLocalCount(topkIdx.count, "topkIdx")
        for (i, idx) in topkIdx.enumerated() {
            // The name is built only for an error: the data path allocates nothing for it.
            func name() -> String { localRanks.count == 1 ? "topkIdx" : "topkIdx[rank \(localRanks[i])]" }
            guard idx.shape.count == 2, idx.shape[1] == config.topK, idx.shape[0] >= 0, idx.shape[0] <= config.maxTokensPerRank else {
                throw .invalidArgument(
                    field: "\(name()).shape", value: "\(idx.shape)",
                    requirement: "must be [tokens in 0...maxTokensPerRank (\(config.maxTokensPerRank)), topK = \(config.topK)]")
            }
            do {
                try TensorCheck.require(idx, "topkIdx", dtypes: [.i32, .i64], shape: idx.shape, location: location)
            } catch {
                try TensorCheck.require(idx, name(), dtypes: [.i32, .i64], shape: idx.shape, location: location)
                throw error
            }
            try requireAligned(idx, name(), idx.dtype.byteSize)
            if idx.dtype != topkIdx[0].dtype {
                throw .invalidArgument(field: "\(name()).dtype", value: "\(idx.dtype)", requirement: "must match rank \(localRanks[0])'s (\(topkIdx[0].dtype))")
            }
        }
        return topkIdx.map { RoutingRows(address: address($0), tokens: $0.shape[0]) }
    }

    /// The update's launch for routing already checked (`routing[i]`: local rank i's `[B, K]`
    /// ids of `indexBytes` each); the step is `handle`'s from here on.
    func enqueueUpdate(_ handle: GPUStepHandle, routing: [RoutingRows], indexBytes: Int, options: CallOptions) throws(EPError) {
        handle.setStep(nil)
        let k = try kernels(.init(indexBytes: indexBytes, receivedIndexBytes: 4, vectorBytes: 16))
        try launch(k.update, threads: workspace.updateThreads, blocks: workspace.updateBlocks, mode: options.launch, sync: [], weighted: false, slices: 1,
                   handle: handle, stream: stream(options)) { r, w in
            guard let i = localIndex(r) else { return }
            w[.topkIdx] = routing[i].address
            w[.tokenCount] = UInt64(routing[i].tokens)
        }
        handle.setStep(.init(routing: routing, indexBytes: indexBytes))
    }

    /// A step's update and its dispatch in one call (the stacked dispatch): one launch of the
    /// fused kernel where the kernel fits and the tuning allows it (`canFuseUpdate`), else the
    /// update's launch and the dispatch's. Same slots, same bits.
    func updateAndDispatch(
        _ handle: GPUStepHandle, routing: [RoutingRows], indexBytes: Int, sources: (Int) -> SendSide, received: (Int) -> ReceiveBuffers,
        receivedIndexBytes: Int, vectorBytes: Int, options: CallOptions
    ) throws(EPError) {
        guard canFuseUpdate(options) else {
            try enqueueUpdate(handle, routing: routing, indexBytes: indexBytes, options: options)
            try dispatch(handle, sources: sources, received: received, receivedIndexBytes: receivedIndexBytes, vectorBytes: vectorBytes,
                         options: options)
            return
        }
        handle.setStep(.init(routing: routing, indexBytes: indexBytes))
        do {
            try dispatch(handle, sources: sources, received: received, receivedIndexBytes: receivedIndexBytes, vectorBytes: vectorBytes,
                         options: options, fused: true)
        } catch {
            handle.setStep(nil)   // nothing ran: no dispatch may use this routing
            throw error
        }
    }

    /// Whether a call with `options` can run update and dispatch as one launch: LL with the
    /// fused kernel compiled (`workspace.fused`: direct transport, its shared memory fits), every
    /// local rank in one launch (virtual ranks not launched per rank; an NCCL rank's one), and
    /// `tuning.fusesUpdate` on, or automatic and no rank in another process (`GPUTuning`).
    func canFuseUpdate(_ options: CallOptions) -> Bool {
        guard workspace.fused, options.launch == .single else { return false }
        if let chosen = tuning.fusesUpdate { return chosen }
        if case .process = placement, config.ranks > 1 { return false }
        return true
    }

    /// Sends every local rank's rows straight into their slots on the destination ranks
    /// (`received(r)`: rank r's receive buffers, for every rank). With `.sendOnly` the rows are
    /// sent but nobody waits for them: `complete()` does. A whole call allocates nothing here.
    /// `sources(i)`: local rank i's rows and counts.
    func dispatch(
        _ handle: GPUStepHandle, sources: (Int) -> SendSide, received: (Int) -> ReceiveBuffers, receivedIndexBytes: Int,
        vectorBytes: Int, options: CallOptions, fused: Bool = false
    ) throws(EPError) {
        let step = try handle.currentStep()
        try checkTransportSupports(options)
        let k = try kernels(.init(indexBytes: step.indexBytes, receivedIndexBytes: receivedIndexBytes, vectorBytes: vectorBytes, transport: transport))
        let mode = options.launch
        // Pieces of the row as it moves: FP8 rows are e4m3, half or a quarter of the element row.
        let pieces = StepArguments.rowPieces(tuning, blocks: blocks(mode), tokens: step.maxTokens, rowBytes: config.wireRowBytes)
        // (HT expert-major also zeroes its zones' padding rows, however few the tokens: every block.)
        var sending = config.isExpertMajorHT ? blocks(mode) : StepArguments.blocks(tuning, blocks(mode), items: step.maxTokens * pieces)
        func enqueue(
            _ sync: SyncBits, _ blocks: Int, _ stream: CUDAStream?, _ sources: (Int) -> SendSide, _ received: (Int) -> ReceiveBuffers,
            kernel: CUDAFunction? = nil
        ) throws(EPError) {
            try launch(kernel ?? k.dispatch, threads: StepWorkspace.threadsPerBlock, blocks: blocks, mode: mode, sync: sync, weighted: false,
                       slices: pieces, handle: handle, stream: stream) { r, w in
                if let i = localIndex(r) {
                    let source = sources(i)
                    w[.tokens] = source.tokens
                    w[.topkIdx] = step.routing[i].address
                    w[.topkWeights] = source.weights
                    w[.tokenCount] = UInt64(step.routing[i].tokens)
                    w[.counts] = source.counts
                    w[.sourceCounts] = source.sourceCounts
                    w[.scales] = source.scales
                }
                let buffers = received(r)
                w[.received] = buffers.rows
                w[.receivedIndices] = buffers.indices
                w[.receivedWeights] = buffers.weights
                w[.receivedScales] = buffers.scales
            }
        }
        // The launch that sends: with `fused`, the update's too (the caller checked canFuseUpdate).
        // Where its dispatch blocks find their rows themselves (EP_LL_OWN in ep_ll.cu), the update
        // block takes the last share of the items: one block more than they need, where the grid
        // has room, leaves it empty.
        let send = fused ? k.updateDispatch : nil
        if fused && k.findsOwnRows { sending = min(blocks(mode), sending + 1) }
        if fused, send == nil { throw .backend("the fused update + dispatch kernel is not compiled for this group") }
        switch options.phase {
        case .whole:
            try enqueue(meetsThroughFlags(mode) ? [.signal, .wait] : [], sending, stream(options), sources, received, kernel: send)
            // Staged: each destination drains what was put into its staging area.
            if let drain = k.drain { try enqueue([], blocks(mode), stream(options), sources, received, kernel: drain) }
        case .sendOnly:
            try enqueue(.signal, sending, stream(options), sources, received, kernel: send)
            let table = (0..<config.ranks).map(received), sent = localRanks.indices.map(sources)
            setPending(PendingCall(name: "dispatch") { stream throws(EPError) in try enqueue([.wait, .noData], 1, stream, { sent[$0] }) { table[$0] } })
        }
        handle.setDispatched()
    }

    /// Every local rank pulls its rows back (`experts(r)`: rank r's expert outputs, for every
    /// rank) and reduces them in the fixed order of docs/architecture.md into `outputs`. With `.sendOnly`
    /// each rank only announces that its expert outputs may be read; `complete()` pulls and reduces.
    /// `targets(i)`: where local rank i's combined rows go.
    func combine(
        _ handle: GPUStepHandle, into targets: (Int) -> CombineTarget, experts: (Int) -> ExpertSide, direction: PassDirection,
        vectorBytes: Int, options: CallOptions
    ) throws(EPError) {
        let step = try handle.dispatchedStep()
        try checkTransportSupports(options)
        let k = try kernels(.init(indexBytes: step.indexBytes, receivedIndexBytes: 4, vectorBytes: vectorBytes, transport: transport))
        let mode = options.launch, flags = meetsThroughFlags(mode)
        let pieces = StepArguments.rowPieces(tuning, blocks: combineBlocks(mode), tokens: step.maxTokens, rowBytes: config.rowBytes)
        let pulling = StepArguments.blocks(tuning, combineBlocks(mode), items: step.maxTokens * pieces)
        // Weights apply in the forward pass of the expert-major layouts (LL: the source's
        // [B, K]; HT: the per-slot weights the destination received).
        let weighted = direction == .forward && (config.layout == .expertMajor || config.isExpertMajorHT)
        func enqueue(
            _ sync: SyncBits, _ blocks: Int, _ stream: CUDAStream?, _ targets: (Int) -> CombineTarget, _ experts: (Int) -> ExpertSide,
            kernel: CUDAFunction? = nil
        ) throws(EPError) {
            try launch(kernel ?? k.combine, threads: StepWorkspace.threadsPerBlock, blocks: blocks, mode: mode, sync: sync, weighted: weighted,
                       slices: pieces, handle: handle, stream: stream) { r, w in
                if let i = localIndex(r) {
                    let target = targets(i)
                    w[.topkIdx] = step.routing[i].address
                    w[.output] = target.tokens
                    w[.weightGradientsOut] = target.weightGradients
                    w[.tokenCount] = UInt64(step.routing[i].tokens)
                }
                let side = experts(r)
                w[.received] = side.rows
                w[.topkWeights] = side.weights
                w[.weightGradientsIn] = side.weightGradients
            }
        }
        // Separate launches wait for their peers' readiness and tell them when their rows were read.
        let pull: SyncBits = flags ? [.wait, .done] : .wait
        switch options.phase {
        case .whole:
            // Staged: the expert side first puts every row back into its source's staging area.
            if let send = k.combineSend { try enqueue([], combineBlocks(mode), stream(options), targets, experts, kernel: send) }
            try enqueue(flags ? pull.union(.signal) : [], pulling, stream(options), targets, experts)
        case .sendOnly:
            try enqueue([.signal, .noData], 1, stream(options), targets, experts)
            let blocks = pulling, table = (0..<config.ranks).map(experts), into = localRanks.indices.map(targets)
            setPending(PendingCall(name: "combine") { stream throws(EPError) in try enqueue(pull, blocks, stream, { into[$0] }) { table[$0] } })
        }
    }

    /// Copies the rows of `handle`'s dispatched step that the peers' combine reads (what each
    /// local rank received: the layout's zones, padding included) from `sources(i)` into
    /// `destinations(i)` (both receive-shaped element rows of local rank i), on the call's
    /// stream; rows outside them are not touched. An NCCL rank's combine from a caller's tensor
    /// (NCCLRankGroup+CallerTensors.swift) copies this instead of the whole worst-case buffer.
    func copyReceivedRows(
        _ handle: GPUStepHandle, from sources: (Int) -> UInt64, to destinations: (Int) -> UInt64, vectorBytes: Int, options: CallOptions
    ) throws(EPError) {
        let step = try handle.dispatchedStep()
        let k = try kernels(.init(indexBytes: step.indexBytes, receivedIndexBytes: 4, vectorBytes: vectorBytes, transport: transport))
        try launch(k.copyReceived, threads: StepWorkspace.threadsPerBlock, blocks: combineBlocks(options.launch), mode: options.launch,
                   sync: [], weighted: false, slices: 1, handle: handle, stream: stream(options)) { r, w in
            guard let i = localIndex(r) else { return }
            w[.tokens] = sources(i)
            w[.received] = destinations(i)
        }
    }

    /// Enqueues the second half of the last send-only dispatch or combine.
    func complete(options: CallOptions) throws(EPError) {
        let call = try takePending()
        try device.makeCurrent()
        try call.enqueue(stream(options))
    }

    // MARK: helpers

    /// The staged transport runs whole calls as separate launches covering every rank (the
    /// launch boundaries order its puts and drains); it has no flag protocol of its own yet.
    func checkTransportSupports(_ options: CallOptions) throws(EPError) {
        guard transport == .staged, options.launch != .single || options.phase != .whole else { return }
        throw .invalidArgument(
            field: "options", value: "launch \(options.launch), phase \(options.phase)",
            requirement: "must be launch .single and phase .whole with the staged transport")
    }

    func stream(_ options: CallOptions) -> CUDAStream? { options.stream.map { CUDAStream(rawValue: $0) } }

    func localIndex(_ rank: Int) -> Int? {
        switch placement {
        case .virtualRanks: rank
        case .process(let mine): rank == mine ? 0 : nil
        }
    }

    func checkLocalCount(_ count: Int, _ name: String) throws(EPError) {
        guard count == localRanks.count else {
            throw .invalidArgument(
                field: "\(name).count", value: "\(count)",
                requirement: "must be \(localRanks.count): one per rank this group drives (\(localRanks))")
        }
    }

    /// 16-byte vectors when every row starts 16-byte aligned, else 8-byte vectors.
    func vectorBytes<First: Sequence<UInt64>, Second: Sequence<UInt64>>(_ first: First, _ second: Second) -> Int {
        guard config.rowBytes % 16 == 0 else { return 8 }
        for a in first where a % 16 != 0 { return 8 }
        for a in second where a % 16 != 0 { return 8 }
        return 16
    }
}
