import Testing
@testable import ep_bench

/// `ep-bench run --help` says what each option takes the way ArgumentParser says it for the
/// others, and which options a run on the CPU refuses.
@Suite("ep-bench: run --help")
struct HelpTextTests {
    static let help = RunCommand.helpMessage(columns: 10_000)

    /// The option's entry: its line and the lines of its help below it, up to the next option.
    static func entry(_ option: String) -> String {
        guard let start = help.range(of: "  \(option) ") ?? help.range(of: "  \(option)\n") else { return "" }
        let rest = help[start.upperBound...]
        let end = rest.range(of: "\n  -")?.lowerBound ?? rest.endIndex
        return rest[..<end].split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: " ")
    }

    /// --dtype and --sharing (a default, kept apart from a value given) wrote their default in
    /// their text, and ArgumentParser added its own values after it: "(default: bf16) (values:
    /// bf16, f16, f32, u8)", where --backend reads "(values: auto, cpu, gpu; default: auto)".
    @Test("--dtype and --sharing name their values and default as --backend does")
    func choiceDefaults() throws {
        #expect(Self.entry("--backend").hasSuffix("(values: auto, cpu, gpu; default: auto)"), "\(Self.entry("--backend"))")
        for (option, values, value) in [("--dtype", "bf16, f16, f32, u8", "bf16"), ("--sharing", "windows, ipc", "windows")] {
            let entry = Self.entry(option)
            #expect(entry.hasSuffix("(values: \(values); default: \(value))"), "\(entry)")
            #expect(!entry.contains("(default: \(value))"), "\(entry)")
        }
        // The defaults are still the values a run takes, and still not taken for an option given.
        let run = try parsed(["--backend", "cpu"], as: RunCommand.self)
        #expect(run.shape.dtype.rawValue == "bf16" && run.shape.givenDtype == nil)
        #expect(run.sharing.rawValue == "windows" && run.givenSharing == nil)
        let given = try parsed(["--transport", "nccl", "--dtype", "bf16", "--sharing", "windows"], as: RunCommand.self)
        #expect(given.shape.givenDtype == .bf16 && given.givenSharing == .ncclWindows)
        #expect(refusal(["--sharing", "windows"])?.message.hasPrefix("--sharing windows applies to --transport nccl") == true)
        #expect(refusal(["--drill", "dies", "--transport", "nccl", "--dtype", "bf16"])?.message.hasPrefix("--dtype bf16 applies to") == true)
        #expect(refusal(["--dtype", "f64"])?.message.contains("Please provide one of 'bf16', 'f16', 'f32' or 'u8'") == true)
    }

    /// The GPU's options said "GPU:" (what they tune), not that the CPU backend refuses them
    /// (only --sms said so, in its last sentence).
    @Test("each GPU option's help says it is for the GPU only")
    func gpuOnly() {
        let options = ["--sms", "--pipeline-depth", "--rows-in-flight", "--row-pieces", "--blocks-per-sm",
                       "--update-chunk-tokens", "--full-grid", "--serial-launches", "--fused-update/--no-fused-update"]
        for option in options {
            #expect(Self.entry(option).contains("GPU only"), "\(option): \(Self.entry(option))")
        }
    }
}
