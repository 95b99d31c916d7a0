import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Testing

/// HT on the GPU equals the CPU oracle bit for bit: rows, counters, zone offsets, local idx and
/// weights, padding, combined rows and weight gradients. Gated on EP_GPU_TESTS=1.
@Suite(.enabled(if: gpuTestsEnabled, "needs a GPU: set EP_GPU_TESTS=1"), .serialized)
struct HTOracleTests {
    static let layouts: [Layout] = [.flat, .expertMajorPadded(alignment: 1), .expertMajorPadded(alignment: 16)]

    @Test(arguments: layouts)
    func randomRoutingsMatchTheOracle(layout: Layout) throws {
        let device = try #require(sharedDevice)
        var cases = 0
        for (i, s) in LLOracleTests.shapes.enumerated() {
            let config = GroupConfig.forLayout(layout, ranks: s.ranks, experts: s.ranks * s.local, topK: s.topK, hidden: s.hidden,
                                               elementType: s.type, maxTokensPerRank: s.maxTokens)
            // Every other shape counts its tokens in chunks of 3 (up to 16 update blocks per rank;
            // chunks of unequal fill, empty ones past the last token); the others in one block.
            let group = try VirtualGPUGroup(config, device: device, tuning: GPUTuning(updateChunkTokens: i % 2 == 0 ? 3 : 256))
            for step in 0..<9 {
                guard let mode = launchMode(step % 4 == 3 ? .perRank : .single) else { continue }
                var random = RandomRouting(seed: UInt64(2000 * i + step))
                let tokens = (0..<s.ranks).map { _ in Int(random.next() % UInt64(s.maxTokens + 1)) }
                let inputs = try StepInputs(config: config, tokens: tokens, seed: UInt64(11 * i + step),
                                        minusOneRate: step % 3 == 0 ? 0.3 : 0.05, skew: step % 3 == 1 ? 2 : 0)
                try stepMatchesTheOracle(group, inputs, tokens, "\(layout) shape \(i) step \(step)",
                                         direction: step % 2 == 1 ? .backward : .forward, mode: mode)
                cases += 1
            }
        }
        #expect(cases >= (perRankTestsEnabled ? 16 : 70))
    }

    @Test(arguments: layouts)
    func edgeCasesAndTheOddCaseMatchTheOracle(layout: Layout) throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig.forLayout(layout, ranks: 4, experts: 16, topK: 4, hidden: 64, elementType: .bf16, maxTokensPerRank: 16)
        let group = try VirtualGPUGroup(config, device: device)
        let cases: [(String, [Int], Float, Int?)] = [
            ("B = 0 everywhere", [0, 0, 0, 0], 0, nil), ("B = 0 on some ranks", [0, 5, 0, 16], 0, nil),
            ("all -1", [16, 16, 16, 16], 1, nil), ("all tokens to one expert", [16, 16, 16, 16], 0, 5),
            ("B = max", [16, 16, 16, 16], 0, nil),
        ]
        for (seed, (label, tokens, minusOne, one)) in cases.enumerated() {
            let inputs = try StepInputs(config: config, tokens: tokens, seed: UInt64(seed), minusOneRate: minusOne, oneExpert: one)
            try stepMatchesTheOracle(group, inputs, tokens, "\(layout) \(label)")
            try stepMatchesTheOracle(group, inputs, tokens, "\(layout) \(label) backward", direction: .backward)
        }
        let odd = GroupConfig.forLayout(layout, ranks: 6, experts: 96, topK: 10, hidden: 2880, elementType: .bf16, maxTokensPerRank: 77)
        let oddGroup = try VirtualGPUGroup(odd, device: device)
        let tokens = Array(repeating: 77, count: 6)
        try stepMatchesTheOracle(oddGroup, StepInputs(config: odd, tokens: tokens, seed: 77, minusOneRate: 0), tokens, "odd \(layout)")
    }

    @Test(arguments: layouts)
    func maskedRankNeitherSendsNorReceives(layout: Layout) throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig.forLayout(layout, ranks: 4, experts: 16, topK: 4, hidden: 32, elementType: .bf16, maxTokensPerRank: 8)
        let group = try VirtualGPUGroup(config, device: device)
        try group.deactivate(rank: 1)
        let tokens = [8, 8, 8, 8]
        let inputs = try StepInputs(config: config, tokens: tokens, seed: 5)
        let buffers = try GPUStep(config, device, tokens: tokens)
        try buffers.upload(inputs)
        try buffers.poison()
        try buffers.enqueue(group, direction: .backward)
        let gpu = try buffers.results(group, direction: .backward)
        expectMatch(gpu, try oracleStep(config, inputs, direction: .backward, masked: [1]), "\(layout) rank 1 masked")
        #expect(gpu[1].received.allSatisfy { $0 == 0xA5 }, "the masked rank received nothing")
    }

    @Test(arguments: layouts)
    func overflowWithTheFailPolicyIsReportedAndWritesNothing(layout: Layout) throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig.forLayout(layout, ranks: 2, experts: 8, topK: 2, hidden: 16, elementType: .bf16,
                                           maxTokensPerRank: 8, maxReceivedTokensPerRank: 5)
        let group = try VirtualGPUGroup(config, device: device)
        let tokens = [8, 8]
        let inputs = try StepInputs(config: config, tokens: tokens, seed: 3, minusOneRate: 0, oneExpert: 0)   // 16 rows to rank 0
        let buffers = try GPUStep(config, device, tokens: tokens)
        try buffers.upload(inputs)
        try buffers.poison()
        try buffers.enqueue(group)
        let required = config.isExpertMajorHT ? (16 + config.alignment - 1) / config.alignment * config.alignment : 16
        #expect(throws: EPError.overflow(rank: 0, required: required, capacity: 5)) { try group.checkStatus() }
        let results = try buffers.results(group, skipStatus: true)
        for result in results {
            #expect(result.received.allSatisfy { $0 == 0xA5 } && result.combined.allSatisfy { $0 == 0xA5 }, "an overflowing step writes nothing")
        }
        // The host oracle says the same.
        #expect(throws: EPError.overflow(rank: 0, required: required, capacity: 5)) { _ = try oracleStep(config, inputs) }
    }

    /// A bad entry in any chunk of any rank's routing voids the step on every rank: the update's
    /// chunk blocks report it to the rank's last block (whichever chunk arrives last), which tells
    /// its peers; nothing is written, the status names the entry, and the next good step matches.
    @Test(arguments: layouts)
    func invalidRoutingInAnyChunkIsReportedAndWritesNothing(layout: Layout) throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig.forLayout(layout, ranks: 2, experts: 8, topK: 2, hidden: 16, elementType: .bf16, maxTokensPerRank: 12)
        // Chunks of 3 tokens: 4 update blocks per rank.
        let group = try VirtualGPUGroup(config, device: device, tuning: GPUTuning(updateChunkTokens: 3))
        let tokens = [12, 11]
        let inputs = try StepInputs(config: config, tokens: tokens, seed: 31, minusOneRate: 0)
        let buffers = try GPUStep(config, device, tokens: tokens)
        // (rank, token, column, id; nil: the token's column-0 expert again): chunk 0 of rank 1,
        // chunk 3 of rank 0, a middle chunk, a repeat.
        let entries: [(Int, Int, Int, Int32?)] = [(1, 1, 1, 8), (0, 10, 0, -2), (1, 7, 0, 12), (0, 4, 1, nil)]
        for (rank, token, column, id) in entries {
            var broken = inputs
            let repeated = id == nil
            broken.routing[rank][token * 2 + column] = id ?? broken.routing[rank][token * 2]
            try buffers.upload(broken)
            try buffers.poison()
            try buffers.enqueue(group)
            let expected = repeated ? "\(EPError.repeatedExpert(token: token, firstColumn: 0, secondColumn: 1, expert: Int(broken.routing[rank][token * 2]), rank: rank))"
                                    : "topkIdx[rank \(rank)][\(token)][\(column)]"
            // (A rank whose peer failed may report the peer's rejection first, as in LLOracleTests.)
            #expect { try group.checkStatus() } throws: { error in "\(error)".contains(expected) || "\(error)".contains("rejected") }
            for (r, result) in try buffers.results(group, skipStatus: true).enumerated() {
                #expect(result.received.allSatisfy { $0 == 0xA5 } && result.combined.allSatisfy { $0 == 0xA5 },
                        "\(layout) rank \(r), bad entry at rank \(rank) token \(token): a bad step writes nothing")
            }
        }
        try buffers.upload(inputs)
        try buffers.poison()
        try buffers.enqueue(group)
        expectMatch(try buffers.results(group), try oracleStep(config, inputs), "\(layout): a good step after bad ones")
    }

    @Test func capturedGraphReplaysWithNewRouting() throws {
        let config = GroupConfig.forLayout(.expertMajorPadded(alignment: 8), ranks: 4, experts: 32, topK: 4, hidden: 256,
                                           elementType: .bf16, maxTokensPerRank: 64)
        // Chunks of 16 tokens: 4 update blocks per rank, whose arrival count every replay resets.
        try graphReplaysMatchTheOracle(config, tokens: [64, 40, 64, 9], firstSeed: 900, tuning: GPUTuning(updateChunkTokens: 16)) { $0 % 2 == 0 ? 0 : 3 }
    }
}

/// The drop policy on the GPU keeps exactly the oracle's rows: per destination, (source rank,
/// token) pairs in order while the receive buffer fits them.
@Suite(.enabled(if: gpuTestsEnabled, "needs a GPU: set EP_GPU_TESTS=1"), .serialized)
struct HTDropPolicyTests {
    @Test(arguments: HTOracleTests.layouts)
    func dropKeepsTheOraclesPrefix(layout: Layout) throws {
        let device = try #require(sharedDevice)
        for (i, (ranks, local, topK, capacity)) in [(2, 4, 2, 7), (4, 2, 3, 19), (8, 4, 8, 40), (3, 3, 4, 13)].enumerated() {
            var config = GroupConfig.forLayout(layout, ranks: ranks, experts: ranks * local, topK: topK, hidden: 24,
                                               elementType: .bf16, maxTokensPerRank: 12, maxReceivedTokensPerRank: capacity)
            config.overflow = .drop
            // Cases 1 and 3 count their tokens in chunks of 5 (3 update blocks per rank).
            let group = try VirtualGPUGroup(config, device: device, tuning: GPUTuning(updateChunkTokens: i % 2 == 1 ? 5 : 256))
            var dropped = 0
            for step in 0..<8 {
                var random = RandomRouting(seed: UInt64(70 * i + step))
                let tokens = (0..<ranks).map { _ in Int(random.next() % 13) }
                let inputs = try StepInputs(config: config, tokens: tokens, seed: UInt64(40 * i + step), skew: step % 2 == 0 ? 3 : 0)
                let buffers = try GPUStep(config, device, tokens: tokens)
                try buffers.upload(inputs)
                try buffers.poison()
                let direction: PassDirection = step % 3 == 2 ? .backward : .forward
                try buffers.enqueue(group, direction: direction)
                let gpu = try buffers.results(group, direction: direction)
                let cpu = try oracleStep(config, inputs, direction: direction)
                expectMatch(gpu, cpu, "\(layout) drop case \(i) step \(step)")
                for r in 0..<ranks {
                    #expect(gpu[r].layout.droppedTokens == cpu[r]!.layout.droppedTokens, "\(layout) drop case \(i) step \(step) rank \(r): dropped")
                    dropped += gpu[r].layout.droppedTokens
                }
            }
            #expect(dropped > 0, "case \(i) never overflowed: the test would not test dropping")
        }
    }
}
