import Testing
@testable import ep_bench

/// A numeric option's text that is no number of its type (letters, a fraction, an exponent, past
/// 64 bits, empty, an empty item of a list) is refused with the option, the text and the bound;
/// ArgumentParser alone said only "The value 'abc' is invalid for '--tokens <tokens>'".
@Suite("ep-bench: values that are not numbers name the bound")
struct UnparseableNumberTests {
    static let cases: [(arguments: [String], bound: String)] = [
        (["--tokens", "abc"], "1...1048576"),
        (["--tokens", "9223372036854775808"], "1...1048576"),
        (["--max-tokens", "1.5"], "1...1048576"),
        (["--ranks", "1.5"], "1...64"),
        (["--ranks", "1e30"], "1...64"),
        (["--hidden", ""], "1...1048576"),
        (["--hidden", "18446744073709551616"], "1...1048576"),
        (["--topk", "x"], "1...32"),
        (["--experts", "0x10"], "1...1048576"),
        (["--layout", "expert-major-padded", "--alignment", "x"], "1...1024"),
        (["--iterations", "many"], "1...100000"),
        (["--iterations", "9223372036854775808"], "1...100000"),
        (["--warmup", "1e30"], "0...10000"),
        (["--warmup", "1.0"], "0...10000"),
        (["--skew", "abc"], "0.0...100.0"),
        (["--skew", ""], "0.0...100.0"),
        (["--seed", "-1"], "0...18446744073709551615"),
        (["--seed", "18446744073709551616"], "0...18446744073709551615"),
        (["--seed", "1e30"], "0...18446744073709551615"),
        (["--seed", ""], "0...18446744073709551615"),
        (["--sms", "x"], "1...4096"),
        (["--sms", "9223372036854775808"], "1...4096"),
        (["--pipeline-depth", "deep"], "1...8"),
        (["--rows-in-flight", ""], "1...16"),
        (["--row-pieces", "auto"], "1...4096"),
        (["--blocks-per-sm", "two"], "1...2"),
        (["--update-chunk-tokens", "1k"], "1...4096"),
        (["--timeout-ms", "1s"], "1...86400000"),
        (["--timeout-ms", "9223372036854775808"], "1...86400000"),
        (["--drill-rank", "x"], "0..<"),
        (["info", "--device", "abc"], "must be a whole number ≥ 0"),
        (["info", "--device", "9223372036854775808"], "out of range: must be ≥ 0"),
        (["info", "--device", ""], "must be a whole number ≥ 0"),
    ]

    @Test("run and info: option TEXT", arguments: cases)
    func single(arguments: [String], bound: String) throws {
        let refused = try #require(refusal(arguments))
        let option = arguments[arguments.count - 2], value = arguments[arguments.count - 1]
        #expect(refused.status == usageStatus, "\(refused)")
        #expect(refused.message.contains("'\(value)'") && refused.message.contains(option), "\(refused)")
        #expect(refused.message.contains(bound), "\(refused)")
    }

    /// The items of a `--tokens` or `--sms` list: the refusal names the item that is wrong.
    static let lists: [(arguments: [String], problem: String, bound: String)] = [
        (["--tokens", "16,,32"], "item 2 of 3 is empty", "1...1048576"),
        (["--tokens", ","], "item 1 of 2 is empty", "1...1048576"),
        (["--tokens", "16,"], "item 2 of 2 is empty", "1...1048576"),
        (["--tokens", " , "], "item 1 of 2 is empty", "1...1048576"),
        (["--tokens", "16,x"], "item 2 of 2 (x) is not a whole number", "1...1048576"),
        (["--tokens", "4,99999999999999999999"], "item 2 of 2 (99999999999999999999) is out of range", "1...1048576"),
        (["--sms", ","], "item 1 of 2 is empty", "1...4096"),
        (["--sms", "16,,32"], "item 2 of 3 is empty", "1...4096"),
        // One item: the message of a single value.
        (["--sms", ""], "must be a whole number in", "1...4096"),
        (["--tokens", "abc"], "must be a whole number in", "1...1048576"),
        (["--tokens", "99999999999999999999"], "out of range: must be in", "1...1048576"),
    ]

    @Test("run: --tokens / --sms LIST", arguments: lists)
    func list(arguments: [String], problem: String, bound: String) throws {
        let refused = try #require(refusal(arguments))
        #expect(refused.status == usageStatus, "\(refused)")
        #expect(refused.message.contains("'\(arguments[1])'") && refused.message.contains(arguments[0]), "\(refused)")
        #expect(refused.message.contains(problem) && refused.message.contains(bound), "\(refused)")
    }

    @Test("numbers in the forms taken before still parse")
    func accepted() throws {
        let run = try parsed(["--backend", "cpu", "--case", "ll-1", "--tokens", " 4 ,+8", "--seed", "18446744073709551615",
                              "--skew", "0x1p3", "--warmup", "0", "--iterations", "1"], as: RunCommand.self)
        #expect(run.shape.tokenCounts == [4, 8])
        #expect(run.seed == .max && run.skew == 8 && run.warmup == 0)
        // --timeout-ms is an NCCL option (refused with virtual ranks).
        #expect(try parsed(["--transport", "nccl", "--timeout-ms", "86400000"], as: RunCommand.self).timeoutMs == 86_400_000)
        let gpu = try parsed(["--backend", "gpu", "--sms", "16,32", "--sms", "66", "--sms", "16"], as: RunCommand.self).gpu
        #expect(gpu.smCounts == [16, 32, 66])
        #expect(try parsed(["info", "--device", "3"], as: InfoCommand.self).device == 3)
    }

    /// ArgumentParser shows "(default: N)" only for options it parses itself; the numeric options
    /// parse their own text, so their help says it, and it must be the default they have.
    @Test("the help still names each numeric option's default")
    func helpDefaults() throws {
        let run = try parsed(["--backend", "cpu"], as: RunCommand.self)
        let help = RunCommand.helpMessage(columns: 10_000)
        /// The option's entry: its line and the lines of its help below it, up to the next option.
        func line(_ option: String) -> String {
            guard let start = help.range(of: "  \(option) <") else { return "" }
            let rest = help[start.upperBound...]
            let end = rest.range(of: "\n  -")?.lowerBound ?? rest.endIndex
            return rest[..<end].split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: " ")
        }
        let defaults: [(String, String)] = [
            ("--warmup", "\(run.warmup)"), ("--skew", "\(run.skew)"), ("--seed", "\(run.seed)"), ("--drill-rank", "\(run.drillRank)"),
            ("--timeout-ms", "\(run.timeoutMs)"), ("--pipeline-depth", "\(run.gpu.pipelineDepth)"),
            ("--rows-in-flight", "\(run.gpu.rowsInFlight)"), ("--update-chunk-tokens", "\(run.gpu.updateChunkTokens)"),
        ]
        for (option, value) in defaults {
            #expect(line(option).hasSuffix("(default: \(value))"), "\(line(option))")
        }
        let info = try parsed(["info"], as: InfoCommand.self)
        #expect(InfoCommand.helpMessage(columns: 10_000).contains("(default: \(info.device))"))
    }
}
