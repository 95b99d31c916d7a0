import ExpertParallel
@testable import ExpertParallelGPU
import Testing

/// How the LL update counts and whether it runs inside the dispatch launch, per configuration:
/// bitmaps (every selection's position at once) where they fit beside the dispatch's row table,
/// per-warp counts otherwise; fused where the update's arrays and the table fit in 48 KB.
struct LLUpdateChoiceTests {
    struct Expected: Sendable, CustomTestStringConvertible {
        var config: GroupConfig
        var bitmaps: Bool
        var warps: Int
        var fused: Bool
        var testDescription: String { "E=\(config.experts) B=\(config.maxTokensPerRank) K=\(config.topK)" }
    }

    static let cases: [Expected] = [
        // ll-std: 256 experts × 4 words of bits; fused.
        Expected(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128),
                 bitmaps: true, warps: 16, fused: true),
        // 1024 tokens: 32 words a row, too many bits; 16 warps' counts fit, fused.
        Expected(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 128, topK: 4, hidden: 2048, maxTokensPerRank: 1024),
                 bitmaps: false, warps: 16, fused: true),
        // 1024 experts, 320 tokens: 8 warps' counts only, and no room for the dispatch's table.
        Expected(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 1024, topK: 8, hidden: 2048, maxTokensPerRank: 320),
                 bitmaps: false, warps: 8, fused: false),
        // One rank: the dispatch blocks' own rows beside the update's bitmaps (EP_LL_OWN) fit at ll-std (below).
        Expected(config: GroupConfig(algorithm: .lowLatency, ranks: 1, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128),
                 bitmaps: true, warps: 16, fused: true),
        // FP8's table is larger (a scale address a lane) and still fits at ll-std.
        Expected(config: GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128,
                                     fp8: FP8Dispatch(scales: .ue8m0Block128, source: .quantize)),
                 bitmaps: true, warps: 16, fused: true),
    ]

    @Test(arguments: cases)
    func choiceFollowsTheSharedMemory(_ expected: Expected) throws {
        let config = try expected.config.validatedForGPU()
        #expect(config.llUpdateUsesBitmaps == expected.bitmaps)
        #expect(config.llUpdateWarps == expected.warps)
        #expect(config.fusesLLUpdate == expected.fused)
        let workspace = StepWorkspace(config)
        #expect(workspace.defines["EP_FUSED"] == (expected.fused ? "1" : "0"))
        #expect(workspace.defines["EP_LL_BITMAP"] == (expected.bitmaps ? "1" : "0"))
        #expect(workspace.updateThreads == 32 * expected.warps)
        let update = expected.bitmaps ? config.llBitmapUpdateSharedMemoryBytes : config.updateSharedMemoryBytes(warps: expected.warps)
        #expect((update + config.fusedDispatchSharedMemoryBytes <= 48 * 1024) == expected.fused)
        // The staged transport has no fused kernel.
        #expect(StepWorkspace(config, transport: .staged).defines["EP_FUSED"] == "0")
    }

    /// The fused kernel's dispatch blocks find their rows themselves where other ranks' tokens fit
    /// a thread's registers (K ≤ 8) or there are no other ranks, and their rows fit beside the
    /// update's bitmaps; elsewhere they wait for the update block, whose choices (bitmaps, fused)
    /// do not depend on it.
    @Test(arguments: [(8, 8, 64, 64, true), (8, 16, 64, 64, false), (4, 32, 64, 64, false), (1, 32, 64, 64, true), (1, 8, 64, 64, true),
                      (2, 1, 64, 64, true), (8, 8, 512, 128, true),
                      // Bitmaps that fit beside the dispatch's table, with no room for the dispatch blocks' own rows.
                      (8, 8, 1024, 128, false), (8, 8, 128, 512, false)])
    func dispatchBlocksFindTheirRowsWhereTheyFit(ranks: Int, topK: Int, experts: Int, tokens: Int, expected: Bool) throws {
        let config = try GroupConfig(algorithm: .lowLatency, ranks: ranks, experts: experts, topK: topK, hidden: 512, maxTokensPerRank: tokens)
            .validatedForGPU()
        #expect(config.llOwnRowsFit == expected)
        let words = (tokens + 31) / 32
        #expect(config.llOwnRowsSharedMemoryBytes == 4 * ((experts + ranks) * words + experts + 1))
        let workspace = StepWorkspace(config)
        #expect(workspace.defines["EP_LL_OWN_FITS"] == (expected ? "1" : "0"))
        #expect(StepWorkspace(config, transport: .staged).defines["EP_LL_OWN_FITS"] == "0")
        // An NCCL rank reads no other rank's routing: its dispatch blocks wait where it has peers.
        let ncclRank = StepWorkspace(config, everyRankHere: false)
        #expect(ncclRank.defines["EP_LL_OWN_FITS"] == (expected && ranks == 1 ? "1" : "0"))
        #expect(ncclRank.fused == workspace.fused)
        if config.llDispatchFindsOwnRows && !expected {
            #expect(config.llUpdateUsesBitmaps && config.fusesLLUpdate, "the update keeps its bitmaps and its launch with the dispatch")
            #expect(config.llBitmapUpdateSharedMemoryBytes + config.llOwnRowsSharedMemoryBytes + config.fusedDispatchSharedMemoryBytes > 48 * 1024)
        }
    }

    @Test func highThroughputNeverFuses() throws {
        let config = try GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 4096)
            .validatedForGPU()
        #expect(!config.fusesLLUpdate && !config.llUpdateUsesBitmaps)
        #expect(StepWorkspace(config).updateThreads == 512)
    }
}
