import ExpertParallel
import ExpertParallelCUDA

// EP_SYNC_* bits of ep_step.cuh.
private let syncSignal: UInt64 = 1, syncWait: UInt64 = 2, syncNoData: UInt64 = 4, syncDone: UInt64 = 8

extension VirtualGPUGroup {
    var location: MemoryLocation { .device(device.ordinal) }

    /// This step's routing for every rank: `topkIdx[r]` is `[B_r, K]` int32 or int64 on the device.
    /// Counts, exchanges counts between ranks and fixes every slot, all on the device.
    public func update(topkIdx: [TensorRef], stream: CUDAStream? = nil, mode: LaunchMode = .single) throws(EPError) {
        try checkNothingPending()
        // A rejected update voids the step, as a failed one on the device does: no dispatch may
        // move this step's tokens with the previous step's routing.
        forgetStep()
        try checkRankCount(topkIdx.count, "topkIdx")
        for (r, idx) in topkIdx.enumerated() {
            guard idx.shape.count == 2, idx.shape[1] == config.topK, idx.shape[0] <= config.maxTokensPerRank else {
                throw .invalidArgument(
                    field: "topkIdx[rank \(r)].shape", value: "\(idx.shape)",
                    requirement: "must be [tokens ≤ maxTokensPerRank (\(config.maxTokensPerRank)), topK = \(config.topK)]")
            }
            try TensorCheck.require(idx, "topkIdx[rank \(r)]", dtypes: [.i32, .i64], shape: idx.shape, location: location)
            try requireAligned(idx, "topkIdx[rank \(r)]", idx.dtype.byteSize)
        }
        let indexBytes = topkIdx[0].dtype.byteSize
        if let r = topkIdx.firstIndex(where: { $0.dtype != topkIdx[0].dtype }) {
            throw .invalidArgument(field: "topkIdx[rank \(r)].dtype", value: "\(topkIdx[r].dtype)", requirement: "must match rank 0's (\(topkIdx[0].dtype))")
        }
        try device.makeCurrent()
        let k = try kernels(.init(indexBytes: indexBytes, receivedIndexBytes: 4, vectorBytes: 16))
        try launch(k.update, threads: updateThreads, blocks: 1, mode: mode, sync: 0, weighted: false, slices: 1, stream: stream) { r, w in
            w[1] = address(topkIdx[r])
            w[8] = UInt64(topkIdx[r].shape[0])
        }
        rememberStep(topkIdx, indexBytes)
    }

    /// Sends every rank's rows straight into their slots on the destination ranks. With
    /// `phase: .sendOnly` the rows are sent but nobody waits for them: `complete()` does.
    public func dispatch(
        _ inputs: [DispatchInput], into outputs: [DispatchOutput], phase: CallPhase = .whole,
        stream: CUDAStream? = nil, mode: LaunchMode = .single
    ) throws(EPError) {
        let step = try currentStep()
        try checkRankCount(inputs.count, "inputs")
        try checkRankCount(outputs.count, "outputs")
        for r in 0..<config.ranks {
            try config.validateDispatch(inputs[r], outputs[r], tokens: step.routing[r].shape[0], location: location)
            try requireAligned(inputs[r].tokens, "inputs[\(r)].tokens", 8)
            try requireAligned(outputs[r].tokens, "outputs[\(r)].tokens", 8)
            try requireAligned(inputs[r].topkWeights, "inputs[\(r)].topkWeights", 4)
            try requireAligned(outputs[r].topkIdx, "outputs[\(r)].topkIdx", outputs[r].topkIdx?.dtype.byteSize ?? 4)
            try requireAligned(outputs[r].topkWeights, "outputs[\(r)].topkWeights", 4)
            // One kernel writes every rank's received ids: they must share a width.
            if let idx = outputs[r].topkIdx, let first = outputs[0].topkIdx, idx.dtype != first.dtype {
                throw .invalidArgument(field: "outputs[\(r)].topkIdx.dtype", value: "\(idx.dtype)", requirement: "must match rank 0's (\(first.dtype))")
            }
        }
        let variant = StepKernels.Variant(
            indexBytes: step.variantIndexBytes, receivedIndexBytes: outputs[0].topkIdx?.dtype.byteSize ?? 4,
            vectorBytes: vectorBytes(inputs.map(\.tokens), outputs.map(\.tokens)))
        try device.makeCurrent()
        let k = try kernels(variant)
        func enqueue(sync: UInt64, blocks: Int, stream: CUDAStream?) throws(EPError) {
            try launch(k.dispatch, threads: Self.threadsPerBlock, blocks: blocks, mode: mode, sync: sync, weighted: false,
                       slices: slices(tokens: maxTokens(step.routing), mode: mode), stream: stream) { r, w in
                w[0] = address(inputs[r].tokens)
                w[1] = address(step.routing[r])
                w[2] = inputs[r].topkWeights.map(address) ?? 0
                w[3] = address(outputs[r].tokens)
                w[4] = outputs[r].topkIdx.map(address) ?? 0
                w[5] = outputs[r].topkWeights.map(address) ?? 0
                w[8] = UInt64(step.routing[r].shape[0])
            }
        }
        switch phase {
        case .whole:
            try enqueue(sync: mode == .perRank ? syncSignal | syncWait : 0, blocks: blocks(mode), stream: stream)
        case .sendOnly:
            try enqueue(sync: syncSignal, blocks: blocks(mode), stream: stream)
            setPending(PendingCall(name: "dispatch") { stream throws(EPError) in
                try enqueue(sync: syncWait | syncNoData, blocks: 1, stream: stream)
            })
        }
    }

    /// Every rank pulls its rows back and reduces them in the fixed order of DESIGN.md. With
    /// `phase: .sendOnly` each rank only announces that its expert outputs may be read;
    /// `complete()` pulls and reduces.
    public func combine(
        _ inputs: [CombineInput], into outputs: [CombineOutput], direction: PassDirection = .forward,
        phase: CallPhase = .whole, stream: CUDAStream? = nil, mode: LaunchMode = .single
    ) throws(EPError) {
        let step = try currentStep()
        try checkRankCount(inputs.count, "inputs")
        try checkRankCount(outputs.count, "outputs")
        for r in 0..<config.ranks {
            try config.validateCombine(inputs[r], outputs[r], tokens: step.routing[r].shape[0], direction: direction, location: location)
            try requireAligned(inputs[r].expertOutputs, "inputs[\(r)].expertOutputs", 8)
            try requireAligned(outputs[r].tokens, "outputs[\(r)].tokens", 8)
            try requireAligned(inputs[r].topkWeights, "inputs[\(r)].topkWeights", 4)
            try requireAligned(inputs[r].weightGradients, "inputs[\(r)].weightGradients", 4)
            try requireAligned(outputs[r].topkWeightGradients, "outputs[\(r)].topkWeightGradients", 4)
        }
        let variant = StepKernels.Variant(
            indexBytes: step.variantIndexBytes, receivedIndexBytes: 4,
            vectorBytes: vectorBytes(inputs.map(\.expertOutputs), outputs.map(\.tokens)))
        try device.makeCurrent()
        let k = try kernels(variant)
        func enqueue(sync: UInt64, blocks: Int, stream: CUDAStream?) throws(EPError) {
            // Weights apply in the forward pass of the expert-major layouts (LL: the source's
            // [B, K]; HT: the per-slot weights the destination received).
            let weighted = direction == .forward && (config.layout == .expertMajor || config.isExpertMajorHT)
            try launch(k.combine, threads: Self.threadsPerBlock, blocks: blocks, mode: mode, sync: sync, weighted: weighted,
                       slices: slices(tokens: maxTokens(step.routing), mode: mode), stream: stream) { r, w in
                w[1] = address(step.routing[r])
                w[2] = inputs[r].topkWeights.map(address) ?? 0
                w[3] = address(inputs[r].expertOutputs)
                w[6] = address(outputs[r].tokens)
                w[8] = UInt64(step.routing[r].shape[0])
                w[9] = inputs[r].weightGradients.map(address) ?? 0
                w[10] = outputs[r].topkWeightGradients.map(address) ?? 0
            }
        }
        // Separate launches wait for their peers' readiness and tell them when their rows were read.
        let pull = mode == .perRank ? syncWait | syncDone : syncWait
        switch phase {
        case .whole:
            try enqueue(sync: mode == .perRank ? syncSignal | pull : 0, blocks: blocks(mode), stream: stream)
        case .sendOnly:
            try enqueue(sync: syncSignal | syncNoData, blocks: 1, stream: stream)
            let blocks = blocks(mode)
            setPending(PendingCall(name: "combine") { stream throws(EPError) in
                try enqueue(sync: pull, blocks: blocks, stream: stream)
            })
        }
    }

    /// Enqueues the second half of the last send-only dispatch or combine.
    public func complete(stream: CUDAStream? = nil) throws(EPError) {
        let call = try takePending()
        try device.makeCurrent()
        try call.enqueue(stream)
    }

    // MARK: helpers

    func checkRankCount(_ count: Int, _ name: String) throws(EPError) {
        guard count == config.ranks else {
            throw .invalidArgument(field: "\(name).count", value: "\(count)", requirement: "must be ranks (\(config.ranks)): one per rank")
        }
    }

    func maxTokens(_ routing: [TensorRef]) -> Int {
        var most = 0
        for idx in routing { most = max(most, idx.shape[0]) }
        return most
    }

    /// 16-byte vectors when every row starts 16-byte aligned, else 8-byte vectors.
    func vectorBytes(_ first: [TensorRef], _ second: [TensorRef]) -> Int {
        guard config.rowBytes % 16 == 0 else { return 8 }
        for tensor in first where address(tensor) % 16 != 0 { return 8 }
        for tensor in second where address(tensor) % 16 != 0 { return 8 }
        return 16
    }
}

func address(_ tensor: TensorRef) -> UInt64 { UInt64(UInt(bitPattern: tensor.address)) }

/// Kernels read rows in 8- or 16-byte vectors and ids and weights whole: a misaligned address
/// would fault on the device, so it is an error here.
/// The name is built only for the error, so the data path allocates nothing for it.
func requireAligned(_ tensor: TensorRef?, _ name: @autoclosure () -> String, _ bytes: Int) throws(EPError) {
    guard let tensor else { return }
    guard address(tensor) % UInt64(bytes) == 0 else {
        throw .invalidArgument(field: "\(name()).address", value: "\(address(tensor))", requirement: "must be a multiple of \(bytes) bytes")
    }
}
