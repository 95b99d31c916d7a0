import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Testing

/// LL on the GPU equals the CPU oracle bit for bit: dispatched rows, counters, idx, weights and
/// combined rows. Gated on EP_GPU_TESTS=1; run on the GPU machine.
@Suite(.enabled(if: gpuTestsEnabled, "needs a GPU: set EP_GPU_TESTS=1"), .serialized)
struct LLOracleTests {
    static let shapes: [(ranks: Int, local: Int, topK: Int, hidden: Int, maxTokens: Int, type: DataType)] = [
        (1, 4, 2, 64, 8, .bf16), (2, 3, 3, 40, 16, .f16), (4, 2, 5, 24, 12, .f32), (8, 4, 8, 128, 24, .bf16),
        (8, 2, 16, 36, 10, .bf16), (2, 16, 32, 8, 6, .f32), (4, 8, 8, 1000, 33, .bf16), (8, 1, 1, 4, 9, .bf16),
        // Up to 1024 tokens a rank: the update counts per warp (its bitmaps would not fit), fused or not.
        (8, 16, 4, 64, 1024, .bf16),
    ]

    @Test(arguments: [Layout.expertMajor, .rankMajor])
    func randomRoutingsMatchTheOracle(layout: Layout) throws {
        let device = try #require(sharedDevice)
        var cases = 0
        for (i, s) in Self.shapes.enumerated() {
            let config = GroupConfig(algorithm: .lowLatency, ranks: s.ranks, experts: s.ranks * s.local, topK: s.topK,
                                     hidden: s.hidden, elementType: s.type, maxTokensPerRank: s.maxTokens, layout: layout)
            let group = try VirtualGPUGroup(config, device: device)
            for step in 0..<13 {
                guard let mode = launchMode(step % 5 == 4 ? .perRank : .single) else { continue }
                var random = RandomRouting(seed: UInt64(1000 * i + step))
                let tokens = (0..<s.ranks).map { _ in Int(random.next() % UInt64(s.maxTokens + 1)) }
                let inputs = try StepInputs(config: config, tokens: tokens, seed: UInt64(7 * i + step), minusOneRate: step % 3 == 0 ? 0.3 : 0.05)
                // Odd steps: update and dispatch in one call (the fused kernel where one launch covers the ranks).
                try stepMatchesTheOracle(group, inputs, tokens, "\(layout) shape \(i) step \(step)",
                                         direction: step % 4 == 3 ? .backward : .forward, mode: mode, fused: step % 2 == 1)
                cases += 1
            }
        }
        #expect(cases >= (perRankTestsEnabled ? 16 : 100))
    }

    @Test(arguments: [Layout.expertMajor, .rankMajor])
    func edgeCasesMatchTheOracle(layout: Layout) throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 16, topK: 4, hidden: 64, elementType: .bf16,
                                 maxTokensPerRank: 16, layout: layout)
        let group = try VirtualGPUGroup(config, device: device)
        let cases: [(String, [Int], Float, Int?)] = [
            ("B = 0 everywhere", [0, 0, 0, 0], 0, nil), ("B = 0 on some ranks", [0, 5, 0, 16], 0, nil),
            ("all -1", [16, 16, 16, 16], 1, nil), ("all tokens to one expert", [16, 16, 16, 16], 0, 5),
            ("B = max", [16, 16, 16, 16], 0, nil),
        ]
        for (seed, (label, tokens, minusOne, one)) in cases.enumerated() {
            let inputs = try StepInputs(config: config, tokens: tokens, seed: UInt64(seed), minusOneRate: minusOne, oneExpert: one)
            try stepMatchesTheOracle(group, inputs, tokens, label)
            try stepMatchesTheOracle(group, inputs, tokens, "\(label), fused", fused: true)
        }
    }

    @Test func oddCaseMatchesTheOracle() throws {
        let device = try #require(sharedDevice)
        for layout in [Layout.expertMajor, .rankMajor] {
            let config = GroupConfig(algorithm: .lowLatency, ranks: 6, experts: 96, topK: 10, hidden: 2880, elementType: .bf16,
                                     maxTokensPerRank: 77, layout: layout)
            let group = try VirtualGPUGroup(config, device: device)
            let tokens = Array(repeating: 77, count: 6)
            let inputs = try StepInputs(config: config, tokens: tokens, seed: 77, minusOneRate: 0)
            try stepMatchesTheOracle(group, inputs, tokens, "odd \(layout)")
            try stepMatchesTheOracle(group, inputs, tokens, "odd \(layout), fused", fused: true)
        }
    }

    @Test func maskedRankNeitherSendsNorReceives() throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 16, topK: 4, hidden: 32, elementType: .bf16, maxTokensPerRank: 8)
        let group = try VirtualGPUGroup(config, device: device)
        try group.deactivate(rank: 2)
        let tokens = [8, 8, 8, 8]
        let inputs = try StepInputs(config: config, tokens: tokens, seed: 5)
        let buffers = try GPUStep(config, device, tokens: tokens)
        try buffers.upload(inputs)
        try buffers.poison()
        try buffers.enqueue(group)
        let gpu = try buffers.results(group)
        let cpu = try oracleStep(config, inputs, masked: [2])
        expectMatch(gpu, cpu, "rank 2 masked")
        #expect(gpu[2].received.allSatisfy { $0 == 0xA5 }, "the masked rank received nothing")
        #expect(try group.activeRanks == RankMask(bits: 0b1011))
        try group.clean(ranks: .all(4))
        try buffers.poison()
        try buffers.enqueue(group)
        expectMatch(try buffers.results(group), try oracleStep(config, inputs), "after clean")
        // The same with update and dispatch in one launch.
        try group.deactivate(rank: 1)
        try buffers.poison()
        try buffers.enqueue(group, fused: true)
        let fused = try buffers.results(group)
        expectMatch(fused, try oracleStep(config, inputs, masked: [1]), "rank 1 masked, fused")
        #expect(fused[1].received.allSatisfy { $0 == 0xA5 }, "the masked rank received nothing (fused)")
        try group.clean(ranks: .all(4))
    }

    @Test func invalidRoutingOnTheDeviceIsReportedAndWritesNothing() throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 8, topK: 2, hidden: 16, elementType: .bf16, maxTokensPerRank: 4)
        let group = try VirtualGPUGroup(config, device: device)
        let tokens = [4, 4]
        var inputs = try StepInputs(config: config, tokens: tokens, seed: 9, minusOneRate: 0)
        let buffers = try GPUStep(config, device, tokens: tokens)
        for (bad, expected, fused) in [(Int32(8), "topkIdx[rank 1][2][1]", false), (Int32(-2), "topkIdx[rank 1][2][1]", false),
                                       (Int32(9), "topkIdx[rank 1][2][1]", true)] {
            var broken = inputs
            broken.routing[1][2 * 2 + 1] = bad
            try buffers.upload(broken)
            try buffers.poison()
            try buffers.enqueue(group, fused: fused)
            #expect { try group.checkStatus() } throws: { error in
                "\(error)".contains(expected) || "\(error)".contains("rejected")
            }
            let results = try (0..<2).map { r in try buffers.results(group, skipStatus: true)[r] }
            for result in results {
                #expect(result.received.allSatisfy { $0 == 0xA5 } && result.combined.allSatisfy { $0 == 0xA5 }, "a bad step writes nothing")
            }
        }
        inputs.routing[0][1] = inputs.routing[0][0]   // token 0 names one expert twice
        try buffers.upload(inputs)
        for fused in [false, true] {
            try buffers.poison()
            try buffers.enqueue(group, fused: fused)
            // The device reports the expert too, as the host backend does.
            #expect(throws: EPError.repeatedExpert(token: 0, firstColumn: 0, secondColumn: 1, expert: Int(inputs.routing[0][0]), rank: 0))
                { try group.checkStatus() }
        }
        let good = try StepInputs(config: config, tokens: tokens, seed: 10)
        try buffers.upload(good)
        try buffers.poison()
        try buffers.enqueue(group)
        expectMatch(try buffers.results(group), try oracleStep(config, good), "a good step after bad ones")
    }

    @Test(arguments: launchModesOfThisPass)
    func sendOnlyThenCompleteMatchesTheOracle(mode: LaunchMode) throws {
        let device = try #require(sharedDevice)
        for layout in [Layout.expertMajor, .rankMajor] {
            let config = GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 16, topK: 4, hidden: 96, elementType: .bf16,
                                     maxTokensPerRank: 12, layout: layout)
            let group = try VirtualGPUGroup(config, device: device)
            for step in 0..<10 {
                let tokens = [12, 7, 0, 12].map { ($0 + step) % 13 }
                let inputs = try StepInputs(config: config, tokens: tokens, seed: UInt64(300 + step))
                try stepMatchesTheOracle(group, inputs, tokens, "\(layout) \(mode) send-only step \(step)", mode: mode, phase: .sendOnly,
                                         fused: step % 2 == 1)
            }
        }
    }

    @Test func splitCallsAreChecked() throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 16, elementType: .bf16, maxTokensPerRank: 4)
        let group = try VirtualGPUGroup(config, device: device)
        let buffers = try GPUStep(config, device, tokens: [4, 4])
        try buffers.upload(StepInputs(config: config, tokens: [4, 4], seed: 1))
        #expect(throws: EPError.wrongOrder("complete() needs a dispatch or combine issued with phase .sendOnly")) { try group.complete() }
        try group.update(topkIdx: buffers.idx.map(\.ref))
        try group.dispatch((0..<2).map { DispatchInput(tokens: buffers.x[$0].ref, topkWeights: buffers.w[$0].ref) },
                           into: (0..<2).map { DispatchOutput(tokens: buffers.received[$0].ref) }, phase: .sendOnly)
        #expect(throws: EPError.wrongOrder("complete() the pending send-only dispatch first")) {
            try group.update(topkIdx: buffers.idx.map(\.ref))
        }
        try group.complete()
        try group.checkStatus()
    }

    /// Every wait is bounded, but no call may need the bound to finish: separate launches per
    /// rank finish far inside the timeout, with no timeout recorded and the mask intact.
    @Test(.enabled(if: perRankTestsEnabled, "the per-rank pass runs it: EP_PER_RANK_TESTS=1"))
    func separateLaunchesNeverWaitForTheTimeout() throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 64, topK: 8, hidden: 512, elementType: .bf16,
                                 maxTokensPerRank: 32, timeout: .seconds(4))
        let group = try VirtualGPUGroup(config, device: device)
        let tokens = Array(repeating: 32, count: 8)
        let buffers = try GPUStep(config, device, tokens: tokens)
        try buffers.upload(StepInputs(config: config, tokens: tokens, seed: 2))
        let start = ContinuousClock.now
        for _ in 0..<20 { try buffers.enqueue(group, mode: .perRank) }
        try group.checkStatus()
        #expect(ContinuousClock.now - start < .seconds(4), "20 steps took longer than one timeout")
        #expect(try group.activeRanks == .all(8))
    }

    @Test func capturedGraphReplaysWithNewRouting() throws {
        let config = GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 32, topK: 4, hidden: 256, elementType: .bf16, maxTokensPerRank: 16)
        try graphReplaysMatchTheOracle(config, tokens: [16, 11, 16, 3], firstSeed: 500) { _ in 0 }
    }

    /// The fused update + dispatch captured in a graph: its launch words (ticket, ready flags)
    /// reset themselves, so every replay runs the update before its rows move.
    @Test func capturedFusedStepReplaysWithNewRouting() throws {
        for layout in [Layout.expertMajor, .rankMajor] {
            let config = GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 64, topK: 6, hidden: 512, elementType: .bf16,
                                     maxTokensPerRank: 32, layout: layout)
            try graphReplaysMatchTheOracle(config, tokens: [32, 1, 0, 32, 17, 32, 5, 32], firstSeed: 900, fused: true) { $0 % 3 == 0 ? 1 : 0 }
        }
    }

    /// One rank: the update block and the dispatch blocks of one launch, nothing to exchange.
    @Test func oneRankFusedStepsMatchTheOracle() throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .lowLatency, ranks: 1, experts: 256, topK: 8, hidden: 7168, elementType: .bf16, maxTokensPerRank: 128)
        let group = try VirtualGPUGroup(config, device: device)
        #expect(group.fusesUpdate)
        for (step, b) in [128, 1, 0, 77, 128].enumerated() {
            let inputs = try StepInputs(config: config, tokens: [b], seed: UInt64(40 + step), minusOneRate: step == 3 ? 0.2 : 0)
            try stepMatchesTheOracle(group, inputs, [b], "one rank, B = \(b)", fused: true)
        }
    }

    /// One rank, one launch: its dispatch blocks find their rows from the routing themselves
    /// (EP_LL_OWN in ep_ll.cu), in both layouts, and move nothing for routing the update
    /// rejects (an id out of range, an expert twice in a token), which is named as before.
    @Test(arguments: [Layout.expertMajor, .rankMajor])
    func oneRankFusedDispatchBlocksFindTheirRows(layout: Layout) throws {
        let device = try #require(sharedDevice)
        let config = GroupConfig(algorithm: .lowLatency, ranks: 1, experts: 64, topK: 8, hidden: 2048, elementType: .bf16,
                                 maxTokensPerRank: 96, layout: layout)
        let group = try VirtualGPUGroup(config, device: device)
        #expect(group.fusesUpdate)
        for (step, b) in [96, 33, 1, 96].enumerated() {
            let inputs = try StepInputs(config: config, tokens: [b], seed: UInt64(140 + step), minusOneRate: step == 1 ? 0.3 : 0)
            try stepMatchesTheOracle(group, inputs, [b], "one rank \(layout), B = \(b)", fused: true)
        }
        let inputs = try StepInputs(config: config, tokens: [96], seed: 150, minusOneRate: 0)
        let buffers = try GPUStep(config, device, tokens: [96])
        var outOfRange = inputs, repeated = inputs
        outOfRange.routing[0][90 * 8 + 3] = 64
        repeated.routing[0][70 * 8 + 5] = repeated.routing[0][70 * 8 + 2]
        let twice = EPError.repeatedExpert(token: 70, firstColumn: 2, secondColumn: 5, expert: Int(inputs.routing[0][70 * 8 + 2]), rank: 0)
        for (broken, expected) in [(outOfRange, "topkIdx[rank 0][90][3]"), (repeated, "\(twice)")] {
            try buffers.upload(broken)
            try buffers.poison()
            try buffers.enqueue(group, fused: true)
            #expect { try group.checkStatus() } throws: { error in "\(error)".contains(expected) }
            let result = try buffers.results(group, skipStatus: true)[0]
            #expect(result.received.allSatisfy { $0 == 0xA5 } && result.combined.allSatisfy { $0 == 0xA5 }, "a bad step writes nothing")
        }
        try buffers.upload(inputs)
        try buffers.poison()
        try buffers.enqueue(group, fused: true)
        expectMatch(try buffers.results(group), try oracleStep(config, inputs), "a good step after bad ones")
    }
}

/// Captures update + dispatch + combine for all ranks in one CUDA graph, then replays it 100
/// times with new routing (and tokens) written into the same buffers, against the oracle each time.
func graphReplaysMatchTheOracle(
    _ config: GroupConfig, tokens: [Int], firstSeed: UInt64, replays: Int = 100, captureMode: StreamCaptureMode = .threadLocal,
    fused: Bool = false, tuning: GPUTuning = GPUTuning(), skew: (Int) -> Double
) throws {
    let device = try #require(sharedDevice)
    let group = try VirtualGPUGroup(config, device: device, tuning: tuning)
    let buffers = try GPUStep(config, device, tokens: tokens)
    try buffers.upload(StepInputs(config: config, tokens: tokens, seed: 0))
    let driver = device.driver
    try driver.beginCapture(on: group.stream, mode: captureMode)
    try buffers.enqueue(group, fused: fused)
    let graph = try driver.endCapture(on: group.stream)
    let exec = try driver.instantiate(graph)
    defer { try? driver.destroy(exec); try? driver.destroy(graph) }
    for replay in 0..<replays {
        let inputs = try StepInputs(config: config, tokens: tokens, seed: firstSeed + UInt64(replay), skew: skew(replay))
        try buffers.upload(inputs)
        try buffers.poison()
        try driver.launch(exec, on: group.stream)
        expectMatch(try buffers.results(group), try oracleStep(config, inputs), "\(config.layout) replay \(replay)")
    }
}

/// Runs one step of `inputs` on the GPU (outputs poisoned first) and compares it with the oracle.
func stepMatchesTheOracle(
    _ group: VirtualGPUGroup, _ inputs: StepInputs, _ tokens: [Int], _ label: String,
    direction: PassDirection = .forward, mode: LaunchMode = .single, phase: CallPhase = .whole, fused: Bool = false
) throws {
    let buffers = try GPUStep(group.config, group.device, tokens: tokens)
    try buffers.upload(inputs)
    try buffers.poison()
    try buffers.enqueue(group, direction: direction, mode: mode, phase: phase, fused: fused)
    expectMatch(try buffers.results(group, direction: direction), try oracleStep(group.config, inputs, direction: direction), label)
}

extension GPUStep {
    func results(_ group: VirtualGPUGroup, skipStatus: Bool) throws -> [StepResult] {
        if !skipStatus { return try results(group) }
        try group.synchronize()
        return try (0..<config.ranks).map { r in
            let rec = try HostTensor(received[r].dtype, received[r].shape), comb = try HostTensor(combined[r].dtype, combined[r].shape)
            try received[r].download(into: rec)
            try combined[r].download(into: comb)
            // A void step has no layout (layoutInfo throws): these results are for the rows only.
            let layout = (try? group.layoutInfo(rank: r))
                ?? LayoutInfo(expertCounters: [], expertOffsets: [], sourceRankCounters: [], expertSourceCounters: [], receivedTotal: 0, droppedTokens: 0)
            return StepResult(received: rec.bytes(), receivedIdx: nil, receivedWeights: nil, combined: comb.bytes(), layout: layout)
        }
    }
}
