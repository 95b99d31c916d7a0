import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import ExpertParallelKernels
import Foundation
import Testing

/// The kernels' run-time settings: bounds named in errors, every setting compiles, and (on the
/// GPU) non-default settings still equal the oracle bit for bit.
struct GPUTuningTests {
    static let config = GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 16, topK: 4, hidden: 64, maxTokensPerRank: 8)

    @Test(arguments: [
        (GPUTuning(pipelineDepth: 0), "tuning.pipelineDepth", "must be in 1...8"),
        (GPUTuning(pipelineDepth: 9), "tuning.pipelineDepth", "must be in 1...8"),
        (GPUTuning(rowsInFlight: 0), "tuning.rowsInFlight", "must be in 1...16"),
        (GPUTuning(rowsInFlight: 17), "tuning.rowsInFlight", "must be in 1...16"),
        (GPUTuning(rowPieces: 0), "tuning.rowPieces", "must be in 1...8 (16-byte vectors in a row)"),
        (GPUTuning(rowPieces: 9), "tuning.rowPieces", "must be in 1...8 (16-byte vectors in a row)"),
        (GPUTuning(blocksPerMultiprocessor: 3), "tuning.blocksPerMultiprocessor", "must be 1 or 2 (two 512-thread blocks fill an SM's registers)"),
        (GPUTuning(updateChunkTokens: 0), "tuning.updateChunkTokens", "must be at least 1"),
    ])
    func outOfBoundsSettingsNameTheFieldTheValueAndTheBound(tuning: GPUTuning, field: String, requirement: String) {
        #expect(throws: EPError.self) { _ = try tuning.validated(Self.config) }
        do {
            _ = try tuning.validated(Self.config)
        } catch {
            guard case let .invalidArgument(f, _, r) = error else { Issue.record("unexpected \(error)"); return }
            #expect(f == field && r == requirement)
        }
    }

    /// updateChunkTokens is checked ≥ 1 only (the C knob is 32 bits; the Swift API takes any
    /// Int): a huge one is one chunk, not an overflow of the round-up (it trapped at Int.max).
    @Test func aHugeUpdateChunkIsOneChunk() throws {
        let ht = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 64, maxTokensPerRank: 4096)
        for chunk in [Int.max, Int.max - 1, 1 << 62, 4096, 4097] {
            let tuning = try GPUTuning(updateChunkTokens: chunk).validated(ht)
            #expect(StepWorkspace(ht, updateChunkTokens: tuning.updateChunkTokens).updateBlocks == 1, "\(chunk)")
        }
        #expect(StepWorkspace.htUpdateChunks(maxTokens: 4096, tokensPerChunk: 256) == 16)
        #expect(StepWorkspace.htUpdateChunks(maxTokens: 257, tokensPerChunk: 256) == 2)
        #expect(StepWorkspace.htUpdateChunks(maxTokens: (1 << 24) - 1, tokensPerChunk: 1) == 16)
    }

    @Test func defaultsAreTheMeasuredOnes() throws {
        let tuning = try GPUTuning().validated(Self.config)
        #expect(tuning.defines == ["EP_UNROLL": "4", "EP_CHUNK": "8"])
    }

    /// A launch takes the blocks its items need, one warp (of 16 a block) per item, never more
    /// than it was given nor fewer than one; with fitsGridToWork off, all it was given.
    @Test(arguments: [(1, 1), (14, 1), (16, 1), (17, 2), (448, 28), (528, 33), (1792, 33), (0, 1)])
    func launchesTakeTheBlocksTheirItemsNeed(items: Int, blocks: Int) {
        #expect(StepArguments.blocks(GPUTuning(), 33, items: items) == blocks)
        #expect(StepArguments.blocks(GPUTuning(fitsGridToWork: false), 33, items: items) == 33)
    }

    /// A row (H 7168 bf16: 896 vectors) is cut into pieces of two vectors a lane (14) where that keeps
    /// at least half the rank's warps busy, else of one (28), never more pieces than warps per
    /// token; the tuning's choice wins. Blocks of 16 warps: ll-std at R = 1 has 132 (14 pieces),
    /// ll-32 at R = 8 33 (still 14: 448 of 528 warps busy), ll-32 at R = 1 and ll-1 take 28.
    @Test(arguments: [(132, 128, 14), (33, 32, 14), (33, 128, 4), (132, 32, 28), (132, 1, 28), (33, 1, 28), (1, 1, 14), (2, 1, 28), (132, 4096, 1)])
    func rowPiecesKeepWarpsBusy(blocks: Int, tokens: Int, pieces: Int) {
        #expect(StepArguments.rowPieces(GPUTuning(), blocks: blocks, tokens: tokens, rowBytes: 14336) == pieces)
        #expect(StepArguments.rowPieces(GPUTuning(rowPieces: 7), blocks: blocks, tokens: tokens, rowBytes: 14336) == 7)
    }

    /// HT keeps a pair's place within its update chunk in 24 bits: more tokens a rank is a named error.
    @Test func htTokensPerRankFitTheUpdatesPlaces() throws {
        let fits = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 64, maxTokensPerRank: (1 << 24) - 1)
        #expect(throws: Never.self) { try fits.validatedForGPU() }
        let over = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 64, maxTokensPerRank: 1 << 24)
        #expect(throws: EPError.invalidConfig(
            field: "maxTokensPerRank", value: "16777216",
            requirement: "must be ≤ 16777215 for HT on the GPU backend (the update stores a pair's place in its chunk in 24 bits)")) {
            try over.validatedForGPU()
        }
    }

    /// The HT kernels count a rank's received rows in 32-bit ints: a configuration whose sources
    /// could send one rank more rows, or whose capacity is larger, is a named error.
    @Test func htReceivedRowsFitThirtyTwoBits() throws {
        func config(_ tokens: Int, alignment: Int = 1, capacity: Int? = nil, layout: Layout? = nil) -> GroupConfig {
            GroupConfig(algorithm: .highThroughput, ranks: 32, experts: 256, topK: 8, hidden: 64, maxTokensPerRank: tokens,
                        maxReceivedTokensPerRank: capacity, layout: layout ?? .expertMajorPadded(alignment: alignment))
        }
        // 32 ranks × B tokens × min(K 8, L 8) rows, plus 8 zones' padding.
        #expect(throws: Never.self) { try config((1 << 23) - 1, capacity: 1 << 20).validatedForGPU() }
        #expect(throws: Never.self) { try config((1 << 23) - 1, alignment: 32, capacity: 1 << 20).validatedForGPU() }
        #expect(throws: EPError.invalidConfig(
            field: "maxTokensPerRank", value: "8388608",
            requirement: "with 32 ranks, topK 8 and 8 local experts a rank could receive 2147483648 rows; the GPU backend counts at most 2147483647")) {
            try config(1 << 23, capacity: 1 << 20).validatedForGPU()
        }
        // Flat: each token reaches a rank once.
        #expect(throws: Never.self) { try config((1 << 24) - 1, capacity: 1 << 20, layout: .flat).validatedForGPU() }
        #expect(throws: EPError.invalidConfig(field: "maxReceivedTokensPerRank", value: "2147483648", requirement: "must be ≤ 2147483647 on the GPU backend")) {
            try config(16, capacity: 1 << 31, layout: .flat).validatedForGPU()
        }
    }

    /// The kernels number a rank's items (token × row piece) in 32 bits: more is a named error.
    @Test func rowPiecesTimesTokensFitThirtyTwoBits() throws {
        let config = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 7168, maxTokensPerRank: (1 << 24) - 1)
        #expect(throws: Never.self) { try GPUTuning(rowPieces: 128).validated(config) }
        #expect(throws: EPError.invalidArgument(
            field: "tuning.rowPieces", value: "129",
            requirement: "must be ≤ 128 with maxTokensPerRank 16777215 (the kernels count token × piece in 32 bits)")) {
            try GPUTuning(rowPieces: 129).validated(config)
        }
    }

    /// The staged transport keeps a received row's index at its source in 26 bits: HT expert-major
    /// counts token × K + k, so B × K may be at most 2^26; flat counts tokens.
    @Test func stagedOriginsFitTheirBits() throws {
        let fits = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 8, topK: 8, hidden: 64, maxTokensPerRank: 1 << 23,
                               maxReceivedTokensPerRank: 1024, layout: .expertMajorPadded(alignment: 1))
        #expect(throws: Never.self) { try StepStaging.check(fits) }
        var over = fits
        over.maxTokensPerRank += 1
        #expect(throws: EPError.invalidConfig(
            field: "maxTokensPerRank", value: "8388609",
            requirement: "with topK 8 must leave at most 67108864 rows a source (the staged transport numbers them in 26 bits)")) {
            try StepStaging.check(over)
        }
        over.layout = .flat
        #expect(throws: Never.self) { try StepStaging.check(over) }
    }

    /// The HT update's blocks per rank: one per chunk of tokens, at most 16, in the handle's words.
    @Test func htUpdateBlocksFollowTheChunkSize() throws {
        let ht = try GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 4096).validatedForGPU()
        #expect(StepWorkspace(ht).updateBlocks == 16)
        #expect(StepWorkspace(ht, updateChunkTokens: 1024).updateBlocks == 4)
        #expect(StepWorkspace(ht, updateChunkTokens: 1).updateBlocks == 16)
        #expect(StepWorkspace(ht, updateChunkTokens: 5000).updateBlocks == 1)
        let odd = try GroupConfig(algorithm: .highThroughput, ranks: 6, experts: 96, topK: 10, hidden: 2880, maxTokensPerRank: 77).validatedForGPU()
        #expect(StepWorkspace(odd).updateBlocks == 1)
        #expect(StepWorkspace(odd, updateChunkTokens: 5).updateBlocks == 16)
        #expect(StepWorkspace(odd, updateChunkTokens: 5).defines["EP_HT_CHUNKS"] == "16")
        // Each chunk keeps a row of counts (E + R words) in the handle, and two words beside them.
        #expect(StepWorkspace(odd, updateChunkTokens: 5).layout - StepWorkspace(odd).layout == 15 * (96 + 6))
        // LL has one update block whatever the setting.
        #expect(StepWorkspace(Self.config, updateChunkTokens: 1).updateBlocks == 1)
    }

    static let runsNVRTC = ProcessInfo.processInfo.environment["EP_REQUIRE_NVRTC"] == "1" || NVRTCLibrary.isAvailable

    /// Every setting at its bounds compiles, for both algorithms and every layout.
    @Test(.enabled(if: runsNVRTC, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"),
          arguments: [Layout.expertMajor, .rankMajor, .flat, .expertMajorPadded(alignment: 8)])
    func extremeSettingsCompile(layout: Layout) throws {
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let algorithm: Algorithm = layout == .expertMajor || layout == .rankMajor ? .lowLatency : .highThroughput
        let config = GroupConfig(algorithm: algorithm, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128, layout: layout)
        for (depth, rows, chunk) in [(1, 1, 1), (8, 16, 256)] {
            let tuning = try GPUTuning(pipelineDepth: depth, rowsInFlight: rows, updateChunkTokens: chunk).validated(config)
            let defines = StepKernels.defines(config, .init(indexBytes: 4, receivedIndexBytes: 4, vectorBytes: 16), tuning)
            let source = KernelSource.embedded(algorithm == .lowLatency ? "ep_ll" : "ep_ht")
            let kernel = try compiler.compile(source, arch: .hopper, defines: defines)
            #expect(kernel.image.starts(with: [0x7F, 0x45, 0x4C, 0x46]), "\(layout) depth \(depth) rows \(rows): a CUBIN")
        }
    }

    /// Non-default settings move data differently but must give the same bits.
    @Test(.enabled(if: gpuTestsEnabled, "needs a GPU: set EP_GPU_TESTS=1"),
          arguments: [GPUTuning(pipelineDepth: 1, rowsInFlight: 1, rowPieces: 1, blocksPerMultiprocessor: 1),
                      GPUTuning(pipelineDepth: 8, rowsInFlight: 16, rowPieces: 3, blocksPerMultiprocessor: 2)])
    func nonDefaultSettingsMatchTheOracle(tuning: GPUTuning) throws {
        let device = try #require(sharedDevice)
        for layout in [Layout.expertMajor, .rankMajor, .flat, .expertMajorPadded(alignment: 4)] {
            let config = GroupConfig.forLayout(layout, ranks: 4, experts: 16, topK: 4, hidden: 200, elementType: .bf16, maxTokensPerRank: 12)
            let group = try VirtualGPUGroup(config, device: device, tuning: tuning)
            let tokens = [12, 5, 0, 12]
            for step in 0..<3 {
                let inputs = try StepInputs(config: config, tokens: tokens, seed: UInt64(60 + step))
                try stepMatchesTheOracle(group, inputs, tokens, "\(layout) tuned step \(step)", direction: step == 2 ? .backward : .forward)
            }
        }
    }
}
