import ExpertParallel
import ExpertParallelGPU
import Testing

/// The staged transport (put + signal into staging areas that the receiver drains, the shape of
/// NCCL's GPU-initiated networking) on one GPU with virtual ranks: every layout, forward and
/// backward, bit for bit against the CPU oracle, as the direct transport is.
@Suite(.enabled(if: gpuTestsEnabled && sharedDevice != nil, "needs a GPU (EP_GPU_TESTS=1)"))
struct StagedTransportTests {
    static let layouts: [Layout] = [.expertMajor, .rankMajor, .flat, .expertMajorPadded(alignment: 4)]

    @Test(arguments: layouts)
    func randomRoutingsMatchTheOracle(layout: Layout) throws {
        let device = try #require(sharedDevice)
        for (i, s) in LLOracleTests.shapes.enumerated() {
            let config = GroupConfig.forLayout(layout, ranks: s.ranks, experts: s.ranks * s.local, topK: s.topK, hidden: s.hidden,
                                               elementType: s.type, maxTokensPerRank: s.maxTokens)
            let group = try VirtualGPUGroup(config, device: device, transport: .staged)
            #expect(group.transport == .staged)
            for step in 0..<4 {
                var random = RandomRouting(seed: UInt64(4000 * i + step))
                let tokens = (0..<s.ranks).map { _ in Int(random.next() % UInt64(s.maxTokens + 1)) }
                let inputs = try StepInputs(config: config, tokens: tokens, seed: UInt64(17 * i + step),
                                        minusOneRate: step % 2 == 0 ? 0.3 : 0.05, skew: step == 1 ? 2 : 0)
                try stepMatchesTheOracle(group, inputs, tokens, "staged \(layout) shape \(i) step \(step)",
                                         direction: step % 2 == 1 ? .backward : .forward)
            }
        }
    }

    @Test(arguments: layouts)
    func aMaskedRankNeitherSendsNorReceives(layout: Layout) throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig.forLayout(layout, ranks: 4, experts: 16, topK: 4, hidden: 32, elementType: .bf16, maxTokensPerRank: 8)
        let group = try VirtualGPUGroup(config, device: device, transport: .staged)
        try group.deactivate(rank: 2)
        let tokens = [8, 5, 8, 8]
        let inputs = try StepInputs(config: config, tokens: tokens, seed: 6)
        let buffers = try GPUStep(config, device, tokens: tokens)
        try buffers.upload(inputs)
        try buffers.poison()
        try buffers.enqueue(group)
        let gpu = try buffers.results(group)
        expectMatch(gpu, try oracleStep(config, inputs, masked: [2]), "staged \(layout) rank 2 masked")
        #expect(gpu[2].received.allSatisfy { $0 == 0xA5 }, "the masked rank received nothing")
    }

    @Test func interleavedHandlesMatchTheOracle() throws {
        let config = GroupConfig.forLayout(.flat, ranks: 4, experts: 16, topK: 3, hidden: 64, elementType: .bf16, maxTokensPerRank: 12)
        let group = try VirtualGPUGroup(config, device: try #require(sharedDevice), transport: .staged)
        let tokensA = [12, 7, 0, 12], tokensB = [3, 12, 12, 9]
        let inputsA = try StepInputs(config: config, tokens: tokensA, seed: 51), inputsB = try StepInputs(config: config, tokens: tokensB, seed: 52)
        let a = try GPUStep(config, group.device, tokens: tokensA), b = try GPUStep(config, group.device, tokens: tokensB)
        for (step, inputs) in [(a, inputsA), (b, inputsB)] {
            try step.upload(inputs)
            try step.poison()
        }
        let handleA = try group.makeHandle(), handleB = try group.makeHandle()
        try group.update(handleA, topkIdx: a.idx.map(\.ref))
        try group.update(handleB, topkIdx: b.idx.map(\.ref))
        try a.dispatch(group, handleA)
        try b.dispatch(group, handleB)
        try b.combine(group, handleB)
        try a.combine(group, handleA)
        expectMatch(try a.results(group, handleA), try oracleStep(config, inputsA), "staged A")
        expectMatch(try b.results(group, handleB), try oracleStep(config, inputsB), "staged B")
    }

    @Test func splitOrSeparateLaunchesAreRefusedByName() throws {
        let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 16, elementType: .bf16, maxTokensPerRank: 4)
        let device = try #require(sharedDevice)
        let group = try VirtualGPUGroup(config, device: device, transport: .staged)
        let buffers = try GPUStep(config, device, tokens: [4, 4])
        try buffers.upload(StepInputs(config: config, tokens: [4, 4], seed: 1))
        #expect {
            try buffers.enqueue(group, mode: .perRank)
        } throws: { error in
            guard case .invalidArgument(let field, _, let requirement)? = error as? EPError else { return false }
            return field == "options" && requirement.contains("staged transport")
        }
        #expect(throws: EPError.self) { try buffers.enqueue(group, phase: .sendOnly) }
    }
}
