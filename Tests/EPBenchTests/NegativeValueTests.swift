import Testing
@testable import ep_bench

/// A negative number after a numeric option is its value, not a flag: the range check names the
/// option, the value and the bound (ArgumentParser's default took `-1` for an option and said
/// "Missing value for '--tokens <tokens>'").
@Suite("ep-bench: negative numbers are values")
struct NegativeValueTests {
    static let cases: [(arguments: [String], bound: String)] = [
        (["--tokens", "-1"], "1...1048576"),
        (["--tokens", "-1,16"], "1...1048576"),
        (["--max-tokens", "-1"], "1...1048576"),
        (["--ranks", "-1"], "1...64"),
        (["--hidden", "-8"], "1...1048576"),
        (["--topk", "-1"], "1...32"),
        (["--experts", "-4"], "1...1048576"),
        (["--layout", "expert-major-padded", "--alignment", "-1"], "1...1024"),
        (["--iterations", "-1"], "1...100000"),
        (["--warmup", "-1"], "0...10000"),
        (["--skew", "-1"], "0.0...100.0"),
        (["--skew", "-inf"], "0.0...100.0"),
        (["--sms", "-1"], "1...4096"),
        (["--pipeline-depth", "-1"], "1...8"),
        (["--rows-in-flight", "-1"], "1...16"),
        (["--row-pieces", "-1"], "1...4096"),
        (["--blocks-per-sm", "-1"], "1...2"),
        (["--update-chunk-tokens", "-1"], "1...4096"),
        (["--timeout-ms", "-1"], "1...86400000"),
        (["--transport", "nccl", "--drill", "dies", "--drill-rank", "-1"], "0..<2"),
        (["--pipeline-depth", "-9223372036854775808"], "1...8"),
    ]

    @Test("run: option -N", arguments: cases)
    func runOption(arguments: [String], bound: String) throws {
        let refused = try #require(refusal(arguments))
        let option = arguments[arguments.count - 2], value = arguments[arguments.count - 1]
        let shown = option == "--skew" ? String(Double(value)!) : String(value.split(separator: ",")[0])
        #expect(refused.status == usageStatus, "\(refused)")
        #expect(refused.message.contains("\(option) \(shown)"), "\(refused)")
        #expect(refused.message.contains(bound), "\(refused)")
    }

    @Test("info --device -1")
    func infoDevice() throws {
        let refused = try #require(refusal(["info", "--device", "-1"]))
        #expect(refused.status == usageStatus)
        #expect(refused.message.contains("--device -1") && refused.message.contains("≥ 0"), "\(refused)")
    }

    @Test("the forms that worked before still do")
    func equalsForm() throws {
        let refused = try #require(refusal(["--warmup=-1"]))
        #expect(refused.message.contains("--warmup -1") && refused.message.contains("0...10000"), "\(refused)")
        let run = try parsed(["--backend", "cpu", "--case", "ll-1", "--tokens", "16,64", "--tokens", "4", "--iterations", "1"], as: RunCommand.self)
        #expect(run.shape.tokenCounts == [16, 64, 4] && run.iterations == 1)
    }
}
