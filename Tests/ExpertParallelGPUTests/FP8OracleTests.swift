import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// FP8 dispatch on the GPU equals the CPU oracle bit for bit: the e4m3 rows and their scale
/// words, counters, received idx and weights (and the combine after it, in the element type),
/// quantising in the kernel (from bf16, f16, f32) or passing the caller's e4m3 rows through, in
/// every layout, R ∈ {1, 2, 4, 8}. Gated on EP_GPU_TESTS=1; run on the GPU machine. Shapes are
/// small: each config compiles one kernel module, and the sweep is 8 configs per scale mode.
@Suite(.enabled(if: gpuTestsEnabled, "needs a GPU: set EP_GPU_TESTS=1"), .serialized)
struct FP8OracleTests {
    static let layouts: [Layout] = [.expertMajor, .rankMajor, .flat, .expertMajorPadded(alignment: 4)]
    static let ranks = [1, 2, 4, 8]

    /// A small FP8 config: hidden is 5 blocks of 128 (or 19 of 32), so a row is not whole warp
    /// chunks of 512 and the last packed scale word is partly padding.
    static func config(_ layout: Layout, ranks: Int, _ mode: FP8ScaleMode, _ source: FP8Dispatch.Source, _ element: DataType = .bf16,
                       maxTokens: Int = 12) -> GroupConfig {
        var config = GroupConfig.forLayout(layout, ranks: ranks, experts: 4 * ranks, topK: min(4, 4 * ranks - 1), hidden: mode.blockSize == 32 ? 608 : 640,
                                           elementType: element, maxTokensPerRank: maxTokens)
        config.fp8 = FP8Dispatch(scales: mode, source: source)
        return config
    }

    /// At least 200 random routings per scale mode: every layout with both sources, R taking each
    /// of 1, 2, 4, 8 twice per mode (and every R with every layout over the three modes); single
    /// launches, per-rank launches, send-only then complete, and backward dispatches among them.
    @Test(arguments: FP8ScaleMode.allCases)
    func randomRoutingsMatchTheOracle(mode: FP8ScaleMode) throws {
        let device = try #require(sharedDevice)
        let modeIndex = FP8ScaleMode.allCases.firstIndex(of: mode)!
        var routings = 0
        for (l, layout) in Self.layouts.enumerated() {
            for (s, source) in [FP8Dispatch.Source.quantize, .passThrough].enumerated() {
                let r = Self.ranks[(2 * l + s + modeIndex) % 4]
                // The element type quantised from: bf16 mostly, f16 and f32 once per mode each.
                let element: DataType = source == .passThrough ? .bf16 : [.bf16, .f16, .f32, .bf16][(l + modeIndex) % 4]
                let config = Self.config(layout, ranks: r, mode, source, element)
                let group = try VirtualGPUGroup(config, device: device)
                for step in 0..<26 {
                    guard let launch = launchMode(step % 5 == 4 ? .perRank : .single) else { continue }
                    var random = RandomRouting(seed: UInt64(10_000 * modeIndex + 100 * (2 * l + s) + step))
                    let tokens = (0..<r).map { _ in Int(random.next() % 13) }
                    let inputs = try StepInputs(fp8: config, tokens: tokens, seed: random.next(), minusOneRate: step % 3 == 0 ? 0.3 : 0.05)
                    try stepMatchesTheOracle(group, inputs, tokens, "\(mode) \(source) \(element) \(layout) R=\(r) step \(step)",
                                             direction: step % 4 == 3 ? .backward : .forward, mode: launch,
                                             phase: step % 7 == 6 ? .sendOnly : .whole, fused: step % 2 == 1)
                    routings += 1
                }
            }
        }
        #expect(routings >= (perRankTestsEnabled ? 40 : 200))
    }

    /// The edge values of docs/fp8.md, quantised from f32 and from bf16, in every scale mode; LL
    /// expert-major and HT expert-major padded (whose padding rows carry zero codes and scales).
    @Test(arguments: FP8ScaleMode.allCases)
    func edgeValuesMatchTheOracle(mode: FP8ScaleMode) throws {
        let device = try #require(sharedDevice)
        for layout in [Layout.expertMajor, .expertMajorPadded(alignment: 8)] {
            for element in [DataType.f32, .bf16] {
                let config = Self.config(layout, ranks: 2, mode, .quantize, element, maxTokens: 24)
                let group = try VirtualGPUGroup(config, device: device)
                let tokens = [24, 17]
                var inputs = try StepInputs(config: config, tokens: tokens, seed: 21, minusOneRate: 0)
                inputs.tokens = try tokens.map { try FP8EdgeValues.rows($0, hidden: config.hidden, blockSize: mode.blockSize, element) }
                try stepMatchesTheOracle(group, inputs, tokens, "edge values \(mode) \(element) \(layout)")
            }
        }
    }

    /// Hidden sizes that are whole warp chunks (7168, as the benchmarks use) and a single block.
    @Test(arguments: FP8ScaleMode.allCases)
    func standardAndTinyRowsMatchTheOracle(mode: FP8ScaleMode) throws {
        let device = try #require(sharedDevice)
        for (hidden, layout, source) in [(7168, Layout.expertMajor, FP8Dispatch.Source.quantize), (7168, .flat, .passThrough),
                                         (mode.blockSize, .rankMajor, .quantize), (mode.blockSize, .expertMajorPadded(alignment: 2), .quantize)] {
            var config = Self.config(layout, ranks: 4, mode, source, maxTokens: 8)
            config.hidden = hidden
            let group = try VirtualGPUGroup(config, device: device)
            let tokens = [8, 3, 0, 8]
            try stepMatchesTheOracle(group, StepInputs(fp8: config, tokens: tokens, seed: UInt64(hidden)), tokens, "\(mode) H=\(hidden) \(layout) \(source)")
        }
    }

    /// Rows of 14 chunks cut into 1, 4 and 5 pieces: the LL dispatch then loads 4, 4 and 3 chunks
    /// ahead of its row lookups (StepKernels.fp8ChunksAhead; with one piece, the rest in batches
    /// after them), from bf16 and f16 rows, in both LL layouts, fused with the update and not.
    @Test(arguments: FP8ScaleMode.allCases)
    func wholePiecesLoadedAheadMatchTheOracle(mode: FP8ScaleMode) throws {
        let device = try #require(sharedDevice)
        for (pieces, layout, element) in [(1, Layout.expertMajor, DataType.bf16), (4, .rankMajor, .f16), (4, .expertMajor, .bf16),
                                          (5, .expertMajor, .f16)] {
            var config = Self.config(layout, ranks: 8, mode, .quantize, element, maxTokens: 16)
            config.hidden = 7168
            let tuning = GPUTuning(rowPieces: pieces)
            #expect(StepKernels.fp8ChunksAhead(try config.validated(), tuning, blocks: 1) == (pieces == 5 ? 3 : 4))
            let group = try VirtualGPUGroup(config, device: device, tuning: tuning)
            for step in 0..<4 {
                var random = RandomRouting(seed: UInt64(700 + 10 * pieces + step))
                let tokens = (0..<8).map { _ in Int(random.next() % 17) }
                try stepMatchesTheOracle(group, StepInputs(fp8: config, tokens: tokens, seed: random.next()), tokens,
                                         "\(mode) \(element) \(layout) \(pieces) pieces step \(step)", fused: step % 2 == 1)
            }
        }
    }

    /// The staged transport (put into staging, drained by the destination) moves scales too.
    @Test(arguments: [FP8Dispatch.Source.quantize, .passThrough])
    func stagedTransportMatchesTheOracle(source: FP8Dispatch.Source) throws {
        let device = try #require(sharedDevice)
        for (i, layout) in Self.layouts.enumerated() {
            let config = Self.config(layout, ranks: 4, FP8ScaleMode.allCases[i % 3], source)
            let group = try VirtualGPUGroup(config, device: device, transport: .staged)
            for step in 0..<4 {
                let tokens = [12, 5, 0, 9].map { ($0 + 3 * step) % 13 }
                try stepMatchesTheOracle(group, StepInputs(fp8: config, tokens: tokens, seed: UInt64(50 + step)), tokens, "staged \(layout) \(source) step \(step)")
            }
        }
    }

    /// A captured graph of update + FP8 dispatch + combine replays with new rows and routing.
    @Test func capturedGraphReplaysWithNewRouting() throws {
        var config = GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 32, topK: 4, hidden: 256, elementType: .bf16, maxTokensPerRank: 16)
        config.fp8 = FP8Dispatch(scales: .ue8m0Block128, source: .quantize)
        try graphReplaysMatchTheOracle(config, tokens: [16, 11, 16, 3], firstSeed: 900, replays: 20) { _ in 0 }
    }

    /// FP8 rows in the element type of combine, or an element tensor where dispatch writes e4m3,
    /// are named errors before anything launches.
    @Test func wrongTypesAreNamedErrors() throws {
        let device = try #require(sharedDevice)
        let config = Self.config(.expertMajor, ranks: 2, .float32Block128, .quantize)
        let group = try VirtualGPUGroup(config, device: device)
        let buffers = try GPUStep(config, device, tokens: [4, 4])
        try buffers.upload(StepInputs(fp8: config, tokens: [4, 4], seed: 3))
        try group.update(topkIdx: buffers.idx.map(\.ref))
        let inputs = (0..<2).map { DispatchInput(tokens: buffers.x[$0].ref, topkWeights: buffers.w[$0].ref) }
        let outputs = (0..<2).map { DispatchOutput(tokens: buffers.received[$0].ref, scales: buffers.receivedScales[$0]!.ref) }
        var missing = outputs
        missing[1].scales = nil
        #expect { try group.dispatch(inputs, into: missing) } throws: { "\($0)".contains("outputs[1].scales") }
        try group.dispatch(inputs, into: outputs)
        // Combine reads expert outputs in the element type: the e4m3 receive buffer is refused.
        let fp8Outputs = (0..<2).map { CombineInput(expertOutputs: buffers.received[$0].ref, topkWeights: buffers.w[$0].ref) }
        #expect { try group.combine(fp8Outputs, into: (0..<2).map { CombineOutput(tokens: buffers.combined[$0].ref) }) } throws: {
            "\($0)".contains("inputs[0].expertOutputs") && "\($0)".contains("e4m3")
        }
        try group.checkStatus()
    }
}
