@testable import ExpertParallelGPU
import ExpertParallel
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
}
