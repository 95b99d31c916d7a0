import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import ExpertParallelKernels
import Foundation
import Testing

/// The data-path kernels of the benchmark's standard shapes keep their registers: ptxas's
/// resource report (NVRTC, no GPU needed) bounds the bytes each spills. A spill in a combine
/// loop cost 2.4× at ht-std R = 8 once (428 bytes); these bounds are what the measured kernels use.
struct KernelResourceTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var config: GroupConfig
        var kernel: String
        var maximumSpill: Int
        /// Virtual ranks (what ep-bench measures on one GPU); false: an NCCL rank's kernels.
        var virtualRanks = true
        /// FP8 quantising LL dispatch: chunks a lane loads ahead of the row lookups (StepKernels.fp8ChunksAhead).
        var chunksAhead = 2
        var testDescription: String {
            "\(kernel) R=\(config.ranks) \(config.layout)\(config.fp8.map { " fp8 \($0)" } ?? "")\(virtualRanks ? "" : " NCCL rank")"
                + (chunksAhead == 2 ? "" : " \(chunksAhead) chunks ahead")
        }
    }

    static let llStandard = GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128)
    static let llOneRank = GroupConfig(algorithm: .lowLatency, ranks: 1, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128)
    static let htStandard = GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 4096, layout: .flat)

    static let htOneRank = GroupConfig(algorithm: .highThroughput, ranks: 1, experts: 32, topK: 8, hidden: 7168, maxTokensPerRank: 4096, layout: .flat)
    static let htExpertMajor = GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 4096,
                                           layout: .expertMajorPadded(alignment: 1))

    static let cases: [Case] = [
        Case(config: llStandard, kernel: "ep_ll_dispatch", maximumSpill: 0),
        // The update inside the dispatch's 512-thread block (64 registers a thread).
        Case(config: llStandard, kernel: "ep_ll_update_dispatch", maximumSpill: 0),
        Case(config: fp8(llStandard, .ue8m0Block128), kernel: "ep_ll_update_dispatch", maximumSpill: 0),
        // An NCCL rank's kernels (flags of system scope, peers' buffers mapped): the fused launch's
        // dispatch blocks wait for the update block's rows (no other rank's routing here).
        Case(config: llStandard, kernel: "ep_ll_update_dispatch", maximumSpill: 0, virtualRanks: false),
        Case(config: llStandard, kernel: "ep_ll_dispatch", maximumSpill: 0, virtualRanks: false),
        Case(config: llStandard, kernel: "ep_ll_combine", maximumSpill: 64, virtualRanks: false),
        Case(config: htStandard, kernel: "ep_ht_dispatch", maximumSpill: 0, virtualRanks: false),
        Case(config: htStandard, kernel: "ep_ht_combine", maximumSpill: 0, virtualRanks: false),
        Case(config: llStandard, kernel: "ep_ll_combine", maximumSpill: 64),
        // One rank: the update without the all-gather, its totals read from shared memory.
        Case(config: llOneRank, kernel: "ep_ll_update_dispatch", maximumSpill: 0),
        Case(config: htStandard, kernel: "ep_ht_dispatch", maximumSpill: 0),
        Case(config: htExpertMajor, kernel: "ep_ht_dispatch", maximumSpill: 0),
        // Flat: the sum without partial registers (ep_flat_term); R = 1 flat: no general loop.
        Case(config: htStandard, kernel: "ep_ht_combine", maximumSpill: 0),
        Case(config: htOneRank, kernel: "ep_ht_combine", maximumSpill: 0),
        Case(config: htExpertMajor, kernel: "ep_ht_combine", maximumSpill: 28),
        // The update reads ahead (two token rows, 8 entries, the next 32 tokens' routing a lane).
        Case(config: htStandard, kernel: "ep_ht_update", maximumSpill: 0),
        Case(config: GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 32, hidden: 7168, maxTokensPerRank: 4096,
                                 layout: .expertMajorPadded(alignment: 128), overflow: .drop),
             kernel: "ep_ht_update", maximumSpill: 0),
        Case(config: GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 16, hidden: 7168, maxTokensPerRank: 4096,
                                 layout: .flat, overflow: .drop),
             kernel: "ep_ht_update", maximumSpill: 0),
        // FP8 dispatch quantising in the kernel: two chunks of 16 elements a lane in flight, the
        // first two loaded ahead of the rows (not from f32 rows: 32 registers, which spilled).
        Case(config: fp8(llStandard, .ue8m0Block128), kernel: "ep_ll_dispatch", maximumSpill: 0),
        // At 8 virtual ranks of an H100 / H200 (33 blocks a rank: pieces of 3–4 chunks), whole pieces
        // ahead: 32 registers a lane held across the row lookups, which spill a few words around them
        // (measured with them: 4 chunks ahead, dispatch 30.1 → 28.6 µs on an H100).
        Case(config: fp8(llStandard, .ue8m0Block128), kernel: "ep_ll_dispatch", maximumSpill: 24, chunksAhead: 4),
        Case(config: fp8(llStandard, .ue8m0Block128), kernel: "ep_ll_update_dispatch", maximumSpill: 20, chunksAhead: 4),
        Case(config: fp8(llStandard, .e8m0Block32), kernel: "ep_ll_dispatch", maximumSpill: 24, chunksAhead: 4),
        Case(config: fp8(llStandard, .float32Block128, elementType: .f32), kernel: "ep_ll_dispatch", maximumSpill: 0),
        Case(config: fp8(llStandard, .e8m0Block32), kernel: "ep_ll_dispatch", maximumSpill: 0),
        Case(config: fp8(htStandard, .float32Block128), kernel: "ep_ht_dispatch", maximumSpill: 0),
        // One rank, FP8 (pieces of one chunk: two ahead), plain and fused: issue 15's one-rank row.
        Case(config: fp8(llOneRank, .ue8m0Block128), kernel: "ep_ll_dispatch", maximumSpill: 0),
        Case(config: fp8(llOneRank, .ue8m0Block128), kernel: "ep_ll_update_dispatch", maximumSpill: 0),
    ]

    static func fp8(_ config: GroupConfig, _ mode: FP8ScaleMode, elementType: DataType? = nil) -> GroupConfig {
        var config = config
        if let elementType { config.elementType = elementType }
        config.fp8 = FP8Dispatch(scales: mode, source: .quantize)
        return config
    }

    @Test(.enabled(if: GPUTuningTests.runsNVRTC, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"), arguments: cases)
    func dataPathKernelsStayInRegisters(_ c: Case) throws {
        let config = try c.config.validated()
        var variant = StepKernels.Variant(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16, oneDevice: c.virtualRanks)
        variant.fp8ChunksAhead = c.chunksAhead
        // A variant's switches (docs/performance.md, "Trying a kernel variant") are checked too.
        let environment = ProcessInfo.processInfo.environment
        let defines = try StepKernels.defines(config, variant, try GPUTuning().validated(config), overrides: environment["EP_KERNEL_DEFINES"])
        let source = KernelSource.embedded(config.algorithm == .lowLatency ? "ep_ll" : "ep_ht")
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let compiled = try compiler.compile(source, arch: .hopper, defines: defines, extraOptions: ["--ptxas-options=-v"])
        let log = compiled.log
        // EP_SAVE_CUBIN=DIR: each case's CUBIN, for nvdisasm (docs/performance.md, "Trying a kernel variant").
        if let folder = environment["EP_SAVE_CUBIN"] {
            let name = c.testDescription.replacingOccurrences(of: " ", with: "_")
            try Data(compiled.image).write(to: URL(fileURLWithPath: folder).appendingPathComponent("\(name).cubin"))
        }
        if environment["EP_PRINT_PTXAS"] != nil { print("ptxas report of \(c.testDescription):\n\(log)") }
        let spill = try #require(Self.spillStores(of: c.kernel, in: log), "no resource report for \(c.kernel) (\(noReportHint)) in:\n\(log)")
        #expect(spill <= c.maximumSpill, "\(c.kernel) spills \(spill) bytes (bound \(c.maximumSpill))")
    }

    /// "N bytes spill stores" from the report that follows "Compiling entry function '<kernel>'".
    static func spillStores(of kernel: String, in log: String) -> Int? {
        let lines = log.split(separator: "\n")
        guard let start = lines.firstIndex(where: { $0.contains("Compiling entry function '\(kernel)'") }) else { return nil }
        for line in lines[start...].dropFirst().prefix(4) where line.contains("bytes spill stores") {
            let words = line.split(separator: " ")
            guard let at = words.firstIndex(of: "spill"), at >= 2 else { return nil }
            return Int(words[at - 2])
        }
        return nil
    }
}
