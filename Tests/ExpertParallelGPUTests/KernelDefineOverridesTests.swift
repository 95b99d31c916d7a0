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
        let defines = try KernelDefineOverrides.parse("EP_COMBINE_SPAN=2,EP_SOLO_VECS=8", reserved: ["EP_R"])
        #expect(defines == ["EP_COMBINE_SPAN": "2", "EP_SOLO_VECS": "8"])
    }

    @Test(arguments: [
        ("EP_COMBINE_SPAN", "EP_COMBINE_SPAN", "entries are NAME=value, separated by commas"),
        ("EP_A=1,", "", "entries are NAME=value, separated by commas"),
        ("COMBINE_SPAN=2", "COMBINE_SPAN=2", "the name must be EP_ followed by capitals, digits or underscores"),
        ("EP_=2", "EP_=2", "the name must be EP_ followed by capitals, digits or underscores"),
        ("EP_x=2", "EP_x=2", "the name must be EP_ followed by capitals, digits or underscores"),
        ("EP_A=-1", "EP_A=-1", "the value must be a non-negative integer of at most 9 digits"),
        ("EP_A=1;rm", "EP_A=1;rm", "the value must be a non-negative integer of at most 9 digits"),
        ("EP_A=", "EP_A=", "the value must be a non-negative integer of at most 9 digits"),
        ("EP_A=1234567890", "EP_A=1234567890", "the value must be a non-negative integer of at most 9 digits"),
        ("EP_R=2", "EP_R=2", "EP_R is set by the group (shape, tuning or contract)"),
        ("EP_A=1,EP_A=2", "EP_A=2", "EP_A is given twice"),
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

    /// The HT combine's switches compile in both layouts: the span (vectors of each row a lane
    /// loads at once) with 2 and 4, and the adaptive flat sum (8 loads in flight whatever a
    /// token's row count); ep-bench checks such a variant's results against the oracle.
    @Test(.enabled(if: GPUTuningTests.runsNVRTC, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"),
          arguments: [Layout.flat, .expertMajorPadded(alignment: 4)], ["EP_COMBINE_SPAN=2", "EP_COMBINE_SPAN=4", "EP_COMBINE_ADAPTIVE=1"])
    func combineSwitchesCompile(layout: Layout, switches: String) throws {
        let config = try GroupConfig(algorithm: .highThroughput, ranks: 4, experts: 32, topK: 6, hidden: 1024, maxTokensPerRank: 64,
                                     layout: layout).validated()
        var defines = StepKernels.defines(config, .init(indexBytes: 8, receivedIndexBytes: 4, vectorBytes: 16), try GPUTuning().validated(config))
        defines.merge(try KernelDefineOverrides.parse(switches, reserved: Set(defines.keys))) { old, _ in old }
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let image = try compiler.compile(KernelSource.embedded("ep_ht"), arch: .hopper, defines: defines).image
        #expect(!image.isEmpty)
    }
}
