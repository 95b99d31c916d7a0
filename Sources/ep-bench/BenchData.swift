import ExpertParallel

/// Inputs of every rank for one case, generated from a fixed seed, and the check of the result.
/// The experts are the identity (expert outputs = dispatched rows), so a correct combine gives
/// x·Σ_k w_k (layouts that apply weights) or x·(destination ranks) (layouts that only sum).
final class BenchData: @unchecked Sendable {
    let tokens: [HostTensor]
    let weights: [HostTensor]
    let topkIdx: [HostTensor]
    let routings: [RoutingTable]
    let tokenCount: Int

    init(config: GroupConfig, tokens count: Int, seed: UInt64, skew: Double) throws(EPError) {
        var tokens: [HostTensor] = [], weights: [HostTensor] = [], idx: [HostTensor] = [], routings: [RoutingTable] = []
        for r in 0..<config.ranks {
            var random = RandomRouting(seed: seed &+ UInt64(r) &* 7919)
            let experts = try random.experts(tokens: count, topK: config.topK, experts: config.experts, skew: skew)
            let x = try HostTensor(config.elementType, [count, config.hidden])
            try x.copy(from: random.payload(count * config.hidden, config.elementType))
            let w = try HostTensor(.f32, [count, config.topK])
            try w.copy(from: random.weights(count * config.topK))
            let i = try HostTensor(.i32, [count, config.topK])
            try i.copy(from: experts)
            tokens.append(x); weights.append(w); idx.append(i)
            routings.append(try RoutingTable(experts: experts, tokens: count, config: config))
        }
        self.tokens = tokens
        self.weights = weights
        topkIdx = idx
        self.routings = routings
        tokenCount = count
    }

    struct Outputs: @unchecked Sendable {
        var dispatchTokens: HostTensor
        var dispatchIdx: HostTensor?
        var dispatchWeights: HostTensor?
        /// FP8 groups: the received rows' scale words (float32 or int32).
        var dispatchScales: HostTensor? = nil
        var combineTokens: HostTensor

        var dispatch: DispatchOutput {
            DispatchOutput(tokens: dispatchTokens.ref, topkIdx: dispatchIdx?.ref, topkWeights: dispatchWeights?.ref, scales: dispatchScales?.ref)
        }
        var combine: CombineOutput { CombineOutput(tokens: combineTokens.ref) }
    }

    func outputs(for config: GroupConfig) throws(EPError) -> Outputs {
        func tensor(_ dtype: DataType, _ shape: [Int]?) throws(EPError) -> HostTensor? {
            guard let shape else { return nil }
            return try HostTensor(dtype, shape)
        }
        return Outputs(
            dispatchTokens: try HostTensor(config.receiveElementType, config.receiveShape),
            dispatchIdx: try tensor(.i32, config.receiveRoutingShape),
            dispatchWeights: try tensor(.f32, config.receiveRoutingShape),
            dispatchScales: try config.fp8.flatMap { fp8 throws(EPError) in try tensor(fp8.scaleType, config.receiveScalesShape) },
            combineTokens: try HostTensor(config.elementType, [tokenCount, config.hidden]))
    }

    func dispatchInput(_ rank: Int) -> DispatchInput {
        DispatchInput(tokens: tokens[rank].ref, topkWeights: weights[rank].ref)
    }

    func combineInput(_ rank: Int, _ outputs: Outputs, _ config: GroupConfig) -> CombineInput {
        // LL expert-major weights at the source; HT expert-major with the per-slot weights received.
        let weightsIn: TensorRef? =
            config.layout == .expertMajor ? weights[rank].ref : config.isExpertMajorHT ? outputs.dispatchWeights!.ref : nil
        return CombineInput(expertOutputs: outputs.dispatchTokens.ref, topkWeights: weightsIn)
    }
}
