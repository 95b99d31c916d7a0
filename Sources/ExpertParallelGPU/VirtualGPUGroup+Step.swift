import ExpertParallel
import ExpertParallelCUDA

extension VirtualGPUGroup {
    var location: MemoryLocation { .device(device.ordinal) }

    /// This step's routing for every rank: `topkIdx[r]` is `[B_r, K]` int32 or int64 on the device.
    /// Counts, exchanges counts between ranks and fixes every slot, all on the device.
    public func update(topkIdx: [TensorRef], stream: CUDAStream? = nil, mode: LaunchMode = .single) throws(EPError) {
        try checkRankCount(topkIdx.count, "topkIdx")
        for (r, idx) in topkIdx.enumerated() {
            guard idx.shape.count == 2, idx.shape[1] == config.topK, idx.shape[0] <= config.maxTokensPerRank else {
                throw .invalidArgument(
                    field: "topkIdx[rank \(r)].shape", value: "\(idx.shape)",
                    requirement: "must be [tokens ≤ maxTokensPerRank (\(config.maxTokensPerRank)), topK = \(config.topK)]")
            }
            try require(idx, "topkIdx[rank \(r)]", [.i32, .i64], idx.shape)
        }
        let indexBytes = topkIdx[0].dtype.byteSize
        if let r = topkIdx.firstIndex(where: { $0.dtype != topkIdx[0].dtype }) {
            throw .invalidArgument(field: "topkIdx[rank \(r)].dtype", value: "\(topkIdx[r].dtype)", requirement: "must match rank 0's (\(topkIdx[0].dtype))")
        }
        try device.makeCurrent()
        let k = try kernels(.init(indexBytes: indexBytes, receivedIndexBytes: 4, vectorBytes: 16))
        try launch(k.update, threads: Self.updateThreads, blocks: 1, mode: mode, weighted: false, slices: 1, stream: stream) { r, w in
            w[1] = address(topkIdx[r])
            w[8] = UInt64(topkIdx[r].shape[0])
        }
        rememberStep(topkIdx, k, indexBytes)
    }

    /// Sends every rank's rows straight into their slots on the destination ranks.
    public func dispatch(
        _ inputs: [DispatchInput], into outputs: [DispatchOutput], stream: CUDAStream? = nil, mode: LaunchMode = .single
    ) throws(EPError) {
        let step = try currentStep()
        try checkRankCount(inputs.count, "inputs")
        try checkRankCount(outputs.count, "outputs")
        for r in 0..<config.ranks {
            try config.validateDispatch(inputs[r], outputs[r], tokens: step.routing[r].shape[0], location: location)
        }
        let rows = inputs.map(\.tokens) + outputs.map(\.tokens)
        let variant = LLKernels.Variant(
            indexBytes: step.variantIndexBytes, receivedIndexBytes: outputs[0].topkIdx?.dtype.byteSize ?? 4,
            vectorBytes: vectorBytes(rows))
        try device.makeCurrent()
        let k = try kernels(variant)
        let tokens = step.routing.map { $0.shape[0] }.max() ?? 0
        try launch(k.dispatch, threads: Self.threadsPerBlock, blocks: blocks(mode), mode: mode, weighted: false,
                   slices: slices(tokens: tokens, mode: mode), stream: stream) { r, w in
            w[0] = address(inputs[r].tokens)
            w[1] = address(step.routing[r])
            w[2] = inputs[r].topkWeights.map(address) ?? 0
            w[3] = address(outputs[r].tokens)
            w[4] = outputs[r].topkIdx.map(address) ?? 0
            w[5] = outputs[r].topkWeights.map(address) ?? 0
            w[8] = UInt64(step.routing[r].shape[0])
        }
    }

    /// Every rank pulls its rows back and reduces them in the fixed order of DESIGN.md.
    public func combine(
        _ inputs: [CombineInput], into outputs: [CombineOutput], direction: PassDirection = .forward,
        stream: CUDAStream? = nil, mode: LaunchMode = .single
    ) throws(EPError) {
        let step = try currentStep()
        try checkRankCount(inputs.count, "inputs")
        try checkRankCount(outputs.count, "outputs")
        for r in 0..<config.ranks {
            try config.validateCombine(inputs[r], outputs[r], tokens: step.routing[r].shape[0], direction: direction, location: location)
        }
        let rows = inputs.map(\.expertOutputs) + outputs.map(\.tokens)
        let variant = LLKernels.Variant(indexBytes: step.variantIndexBytes, receivedIndexBytes: 4, vectorBytes: vectorBytes(rows))
        try device.makeCurrent()
        let k = try kernels(variant)
        let tokens = step.routing.map { $0.shape[0] }.max() ?? 0
        try launch(k.combine, threads: Self.threadsPerBlock, blocks: blocks(mode), mode: mode,
                   weighted: direction == .forward && config.layout == .expertMajor,
                   slices: slices(tokens: tokens, mode: mode), stream: stream) { r, w in
            w[1] = address(step.routing[r])
            w[2] = inputs[r].topkWeights.map(address) ?? 0
            w[3] = address(inputs[r].expertOutputs)
            w[6] = address(outputs[r].tokens)
            w[8] = UInt64(step.routing[r].shape[0])
        }
    }

    // MARK: helpers

    func checkRankCount(_ count: Int, _ name: String) throws(EPError) {
        guard count == config.ranks else {
            throw .invalidArgument(field: "\(name).count", value: "\(count)", requirement: "must be ranks (\(config.ranks)): one per rank")
        }
    }

    func require(_ tensor: TensorRef, _ name: String, _ dtypes: [DataType], _ shape: [Int]) throws(EPError) {
        try TensorCheck.require(tensor, name, dtypes: dtypes, shape: shape, location: location)
    }

    /// 16-byte vectors when every row starts 16-byte aligned, else 8-byte vectors.
    func vectorBytes(_ tensors: [TensorRef]) -> Int {
        let aligned = config.rowBytes % 16 == 0 && tensors.allSatisfy { address($0) % 16 == 0 }
        return aligned ? 16 : 8
    }
}

func address(_ tensor: TensorRef) -> UInt64 { UInt64(UInt(bitPattern: tensor.address)) }
