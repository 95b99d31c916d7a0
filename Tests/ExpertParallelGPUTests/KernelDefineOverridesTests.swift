@testable import ExpertParallelGPU
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelKernels
import Testing

/// EP_KERNEL_DEFINES: extra compile-time switches for trying kernel variants; malformed entries
/// and names the group sets are named errors, not silently ignored or compiled.
struct KernelDefineOverridesTests {
    @Test func unsetOrEmptyGivesNothing() throws {
        #expect(try KernelDefineOverrides.parse(nil, reserved: []) == [:])
        #expect(try KernelDefineOverrides.parse("", reserved: []) == [:])
    }

    @Test func entriesBecomeDefines() throws {
        let defines = try KernelDefineOverrides.parse("EP_COMBINE_SPAN=2,EP_SOLO_VECS=8,EP_COMBINE_ADAPTIVE=0", reserved: ["EP_R"])
        #expect(defines == ["EP_COMBINE_SPAN": "2", "EP_SOLO_VECS": "8", "EP_COMBINE_ADAPTIVE": "0"])
    }

    static let names = "the name must be one of the switches that can be tried: EP_COMBINE_SPAN 1...8, EP_COMBINE_ADAPTIVE 0...1, EP_COMBINE_FEW_ROWS 0...8, EP_COMBINE_FEW_SPAN 1...8, EP_SOLO_VECS 1...16, EP_LL_AHEAD 0...1, EP_LL_SOLO_UPDATE 0...1, EP_FP8_IN_FLIGHT 1...4, EP_FP8_AHEAD 1...4, EP_DEST_GROUP 1...8, EP_PREFETCH_PIECE 0...1, EP_ROW_LOADS 0...2, EP_LL_OWN_ROWS 0...1, EP_HT_STAGE 0...1, EP_HT_BULK 0...1"

    @Test(arguments: [
        ("EP_COMBINE_SPAN", "EP_COMBINE_SPAN", "entries are NAME=value, separated by commas"),
        ("EP_COMBINE_SPAN=1,", "", "entries are NAME=value, separated by commas"),
        ("EP_COMBINE_SPAM=2", "EP_COMBINE_SPAM=2", names),   // misspelt: would measure the default
        ("EP_R=2", "EP_R=2", names),                         // a shape constant
        ("EP_FP8=1", "EP_FP8=1", names),                     // a constant the group leaves unset
        ("EP_COMBINE_SPAN=0", "EP_COMBINE_SPAN=0", "EP_COMBINE_SPAN takes a decimal integer in 1...8"),
        ("EP_COMBINE_SPAN=-1", "EP_COMBINE_SPAN=-1", "EP_COMBINE_SPAN takes a decimal integer in 1...8"),
        ("EP_COMBINE_SPAN=02", "EP_COMBINE_SPAN=02", "EP_COMBINE_SPAN takes a decimal integer in 1...8"),   // octal to the compiler
        ("EP_COMBINE_SPAN=2;x", "EP_COMBINE_SPAN=2;x", "EP_COMBINE_SPAN takes a decimal integer in 1...8"),
        ("EP_SOLO_VECS=", "EP_SOLO_VECS=", "EP_SOLO_VECS takes a decimal integer in 1...16"),
        ("EP_SOLO_VECS=99999999999999999999", "EP_SOLO_VECS=99999999999999999999", "EP_SOLO_VECS takes a decimal integer in 1...16"),
        ("EP_COMBINE_ADAPTIVE=1,EP_COMBINE_ADAPTIVE=0", "EP_COMBINE_ADAPTIVE=0", "EP_COMBINE_ADAPTIVE is given twice"),
    ])
    func badEntriesNameTheEntryAndTheRule(text: String, entry: String, requirement: String) {
        do {
            let defines = try KernelDefineOverrides.parse(text, reserved: ["EP_R"])
            Issue.record("accepted \(text) as \(defines)")
        } catch {
            guard case let .invalidArgument(field, value, rule) = error else { Issue.record("unexpected \(error)"); return }
            #expect(field == "EP_KERNEL_DEFINES" && value == entry && rule == requirement)
        }
    }

    /// What a benchmark records of the variant: the switches sorted by name, so the same variant
    /// reads the same whatever order it was given in; an invalid text as it is (the run fails on it).
    @Test func theRecordedVariantIsTheSortedSwitches() {
        #expect(KernelVariant.normalized(nil) == nil)
        #expect(KernelVariant.normalized("") == nil)
        #expect(KernelVariant.normalized("EP_LL_AHEAD=0,EP_HT_BULK=1") == "EP_HT_BULK=1,EP_LL_AHEAD=0")
        #expect(KernelVariant.normalized("EP_HT_BULK=1,EP_FP8_AHEAD=2") == "EP_FP8_AHEAD=2,EP_HT_BULK=1")
        #expect(KernelVariant.normalized("EP_HT_BULK=2") == "EP_HT_BULK=2")
        #expect(KernelVariant.normalized("EP_R=8,EP_HT_BULK=1") == "EP_R=8,EP_HT_BULK=1")
    }

    /// A switch the group set itself, unless StepKernels.overridable lets a try replace it (EP_FP8_AHEAD:
    /// FP8ChunksAheadTests).
    @Test func aSwitchTheGroupSetsIsRefused() {
        #expect(throws: EPError.self) { try KernelDefineOverrides.parse("EP_COMBINE_SPAN=2", reserved: ["EP_COMBINE_SPAN"]) }
    }

    /// The HT combine's switches compile in both layouts: the span (vectors of each row a lane
    /// loads at once) with 2 and 4, and the adaptive flat sum (8 loads in flight whatever a
    /// token's row count); ep-bench checks such a variant's results against the oracle.
    @Test(.enabled(if: GPUTuningTests.runsNVRTC, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"),
          arguments: [Layout.flat, .expertMajorPadded(alignment: 4)], ["EP_COMBINE_SPAN=2", "EP_COMBINE_SPAN=4", "EP_COMBINE_ADAPTIVE=1", "EP_COMBINE_FEW_ROWS=3,EP_COMBINE_FEW_SPAN=4"])
    func combineSwitchesCompile(layout: Layout, switches: String) throws {
        try Self.compile(.highThroughput, ranks: 4, layout: layout, switches: switches)
    }

    /// The HT update without its shared-memory copies (EP_HT_STAGE=0), in both layouts, with
    /// the drop policy too (its second all-gather reads a table of its own).
    @Test(.enabled(if: GPUTuningTests.runsNVRTC, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"),
          arguments: [Layout.flat, .expertMajorPadded(alignment: 4)], [OverflowPolicy.fail, .drop])
    func updateStagingSwitchCompiles(layout: Layout, overflow: OverflowPolicy) throws {
        try Self.compile(.highThroughput, ranks: 4, layout: layout, switches: "EP_HT_STAGE=0", overflow: overflow)
    }

    /// The LL switches compile in both LL layouts: the dispatch without its load ahead
    /// (EP_LL_AHEAD=0), the one-rank update either way (EP_LL_SOLO_UPDATE, R = 1) and the one-rank
    /// fused launch's dispatch blocks waiting for the update's rows (EP_LL_OWN_ROWS=0).
    @Test(.enabled(if: GPUTuningTests.runsNVRTC, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"),
          arguments: [(4, Layout.expertMajor, "EP_LL_AHEAD=0"), (4, .rankMajor, "EP_LL_AHEAD=0"),
                      (1, .expertMajor, "EP_LL_SOLO_UPDATE=1"), (1, .rankMajor, "EP_LL_SOLO_UPDATE=1"), (1, .expertMajor, "EP_LL_SOLO_UPDATE=0"),
                      (1, .expertMajor, "EP_LL_OWN_ROWS=0"), (1, .rankMajor, "EP_LL_OWN_ROWS=0")])
    func lowLatencySwitchesCompile(ranks: Int, layout: Layout, switches: String) throws {
        try Self.compile(.lowLatency, ranks: ranks, layout: layout, switches: switches)
    }

    /// The dispatch's copy with 4 and 8 destination addresses read before its stores
    /// (EP_DEST_GROUP; LL and HT) and without the piece's L2 prefetch (EP_PREFETCH_PIECE=0, LL).
    @Test(.enabled(if: GPUTuningTests.runsNVRTC, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"),
          arguments: [Algorithm.lowLatency, .highThroughput], ["EP_DEST_GROUP=4", "EP_DEST_GROUP=8", "EP_PREFETCH_PIECE=0",
                                                                "EP_ROW_LOADS=1", "EP_ROW_LOADS=2"])
    func destinationGroupCompiles(algorithm: Algorithm, switches: String) throws {
        try Self.compile(algorithm, ranks: 4, layout: algorithm == .lowLatency ? .expertMajor : .flat, switches: switches)
    }

    /// The FP8 dispatch quantising in the kernel, with and without its first batch loaded ahead,
    /// with 1 and 4 chunks a warp loads at once (EP_FP8_IN_FLIGHT), with 4 and 8 destination
    /// addresses read before the stores (EP_DEST_GROUP) and without the piece's L2 prefetch
    /// (EP_PREFETCH_PIECE=0), from bf16 and f32 rows.
    @Test(.enabled(if: GPUTuningTests.runsNVRTC, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"),
          arguments: [(DataType.bf16, "EP_LL_AHEAD=0"), (.bf16, "EP_FP8_IN_FLIGHT=1"), (.bf16, "EP_FP8_IN_FLIGHT=4"), (.bf16, "EP_FP8_AHEAD=4"),
                      (.bf16, "EP_DEST_GROUP=4"), (.bf16, "EP_DEST_GROUP=8"), (.bf16, "EP_PREFETCH_PIECE=0"), (.f32, "EP_FP8_IN_FLIGHT=4,EP_LL_AHEAD=0")])
    func fp8SwitchesCompile(dtype: DataType, switches: String) throws {
        try Self.compile(.lowLatency, ranks: 4, layout: .expertMajor, switches: switches,
                         dtype: dtype, fp8: FP8Dispatch(scales: .ue8m0Block128, source: .quantize))
    }

    /// Compiles the algorithm's step kernels under NVRTC with `switches` (EP_KERNEL_DEFINES's form)
    /// over a small group's defines.
    static func compile(_ algorithm: Algorithm, ranks: Int, layout: Layout, switches: String, dtype: DataType = .bf16,
                        fp8: FP8Dispatch? = nil, overflow: OverflowPolicy = .fail) throws {
        let config = try GroupConfig(algorithm: algorithm, ranks: ranks, experts: 32, topK: 6, hidden: 1024, elementType: dtype,
                                     maxTokensPerRank: 64, layout: layout, overflow: overflow, fp8: fp8).validated()
        let variant = StepKernels.Variant(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16, oneDevice: true)   // virtual ranks
        let defines = try StepKernels.defines(config, variant, try GPUTuning().validated(config), overrides: switches)
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let source = KernelSource.embedded(algorithm == .lowLatency ? "ep_ll" : "ep_ht")
        let image = try compiler.compile(source, arch: .hopper, defines: defines).image
        #expect(!image.isEmpty)
    }
}
