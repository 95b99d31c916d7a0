import ArgumentParser
import ExpertParallel
import Foundation
import Testing
@testable import ep_bench

/// `--max-tokens M`: groups sized for M tokens per rank (a decode server's group, sized once for
/// its largest batch) while each step dispatches B ≤ M. Until it, a group's maxTokensPerRank was
/// always the step's B, so steps smaller than their group could not be measured.
@Suite("ep-bench: --max-tokens")
struct MaxTokensTests {
    static let cpu = ["--backend", "cpu"]
    /// A custom shape the CPU runs in well under a second.
    static let tiny = ["--case", "custom", "--hidden", "256", "--topk", "4", "--experts", "16", "--ranks", "4"]

    static func cases(_ arguments: [String]) throws -> [BenchCase] {
        try parsed(arguments, as: RunCommand.self).shape.resolve(defaults: RunCommand.Defaults.cpu)
    }

    @Test("M below a step's B is a usage error naming --max-tokens, its value and the bound")
    func belowTheTokens() throws {
        let tail = ": the group must hold every step's tokens)"
        for (arguments, expected) in [
            (["--case", "ll-1", "--tokens", "32", "--max-tokens", "16"],
             "--max-tokens 16 is out of range: must be in 32...1048576 (at least --tokens 32" + tail),
            // A list: the largest count is the bound, wherever it stands in the list.
            (["--case", "ll-1", "--tokens", "8,64,32", "--max-tokens", "16"],
             "--max-tokens 16 is out of range: must be in 64...1048576 (at least 64, the largest of --tokens 8,64,32" + tail),
            (["--case", "ll-1", "--tokens", "8", "--tokens", "64", "--max-tokens", "63"],
             "--max-tokens 63 is out of range: must be in 64...1048576 (at least 64, the largest of --tokens 8,64" + tail),
            // No --tokens: the cases' own, the largest of them (ht-cpu's 512 after ll-std's 128).
            (["--case", "ll-std", "--max-tokens", "127"],
             "--max-tokens 127 is out of range: must be in 128...1048576 (at least the 128 tokens per rank of case ll-std" + tail),
            (["--max-tokens", "200"],
             "--max-tokens 200 is out of range: must be in 512...1048576 (at least the 512 tokens per rank of case ht-cpu" + tail),
            (["--max-tokens", "0"], "--max-tokens 0 is out of range: must be in 1...1048576"),
            (["--max-tokens", "1048577"], "--max-tokens 1048577 is out of range: must be in 1...1048576"),
        ] {
            let refused = try #require(refusal(Self.cpu + arguments), "\(arguments)")
            #expect(refused.status == usageStatus, "\(refused)")
            #expect(refused.message == expected, "\(refused)")
        }
        // M equal to the largest B is a group of exactly that size.
        #expect(refusal(Self.cpu + ["--case", "ll-1", "--tokens", "8,64", "--max-tokens", "64"]) == nil)
        #expect(refusal(Self.cpu + ["--max-tokens", "512"]) == nil)
        // A drill runs no case: the option is refused by name there, as the other shape options are.
        let drill = try #require(refusal(["--transport", "nccl", "--drill", "dies", "--max-tokens", "64"]))
        #expect(drill.status == usageStatus && drill.message.hasPrefix("--max-tokens 64 applies to the cases' timed runs"), "\(drill)")
    }

    @Test("the groups are sized for M, each step dispatches B")
    func config() throws {
        let resolved = try Self.cases(Self.cpu + ["--case", "ll-1", "--case", "ht-cpu", "--tokens", "8,16", "--max-tokens", "64"])
        #expect(resolved.map(\.name) == ["ll-1", "ll-1", "ht-cpu", "ht-cpu"])
        #expect(resolved.map(\.tokens) == [8, 16, 8, 16])
        #expect(resolved.allSatisfy { $0.maxTokens == 64 && $0.config().maxTokensPerRank == 64 })
        // HT's receive capacity follows M as GroupConfig derives it (flat: R × M).
        let ht = try #require(resolved.last)
        #expect(ht.config().receiveCapacity == ht.ranks * 64)
        #expect(ht.label.hasSuffix("B=16 max=64"), "\(ht.label)")
        // Custom takes it too; without the option the group is the step's B, as before.
        let custom = try Self.cases(Self.cpu + Self.tiny + ["--tokens", "8", "--max-tokens", "32"])
        #expect(custom.map { $0.config().maxTokensPerRank } == [32] && custom.map(\.tokens) == [8])
        let plain = try Self.cases(Self.cpu + ["--case", "ll-std", "--tokens", "8"])
        #expect(plain.map(\.maxTokens) == [nil] && plain.map { $0.config().maxTokensPerRank } == [8])
        #expect(!plain[0].label.contains("max"))
        let run = try parsed(Self.cpu + ["--case", "ll-1", "--max-tokens", "4"], as: RunCommand.self)
        #expect(run.optionsRecord.maxTokens == 4 && run.shape.given.contains { $0.text == "--max-tokens 4" })
    }

    /// NCCL ranks resolve their cases through the same options (`casesOfJob`), so they take M too.
    @Test("NCCL ranks' cases keep M")
    func ncclJob() throws {
        let run = try parsed(["run", "--transport", "nccl", "--case", "ll-std", "--tokens", "32", "--max-tokens", "128"], as: RunCommand.self)
        let kept = try run.casesOfJob(world: 4, rank: 1)
        #expect(kept.map { $0.config().maxTokensPerRank } == [128] && kept.map(\.tokens) == [32] && kept.map(\.ranks) == [4])
        #expect(refusal(["--transport", "nccl", "--case", "ll-std", "--tokens", "32", "--max-tokens", "31"])?.message
                .hasPrefix("--max-tokens 31 is out of range: must be in 32...1048576") == true)
    }

    /// Every layout on the CPU with M = 4 B: the results check against the oracle (`run` throws
    /// where they differ), and the bytes and floors are those of the same step in a group of B.
    @Test("a CPU run with M > B validates; bytes and floors count B", arguments: ["expert-major", "rank-major", "flat", "expert-major-padded"])
    func cpuRun(layout: String) throws {
        let shape = Self.cpu + Self.tiny + ["--layout", layout, "--tokens", "8"]
        let sized = try #require(try Self.cases(shape + ["--max-tokens", "32"]).first)
        let plain = try #require(try Self.cases(shape).first)
        let runner = HostBenchmark(iterations: 1, warmup: 0, seed: 1, skew: 0)
        let m = try runner.run(sized, copyBandwidth: 10), b = try runner.run(plain, copyBandwidth: 10)
        #expect(m.validated && m.tokens == 8 && m.maxTokensPerRank == 32)
        #expect(b.maxTokensPerRank == nil)
        #expect(m.bytesPerRank == b.bytesPerRank && m.floorBytes == b.floorBytes && m.bytesPerRank > 0)
        #expect(m.step.floorBytes == b.step.floorBytes && m.combine?.floorBytes == b.combine?.floorBytes)
        // The table's B column names the group's M; the JSON has it only where given.
        let table = Table.render([m])
        #expect(table.contains("  8 (max 32)  ") && table.contains(Table.groupLegend), "\(table)")
        #expect(!Table.render([b]).contains("(max") && !Table.render([b]).contains(Table.groupLegend))
        let json = { (x: ep_bench.Measurement) in String(decoding: try JSONEncoder().encode(x), as: UTF8.self) }
        #expect(try json(m).contains("\"maxTokensPerRank\":32"))
        #expect(try !json(b).contains("maxTokensPerRank"))
    }

    @Test("without --max-tokens the run's record has no key for it")
    func recordUnchanged() throws {
        let encode = { (arguments: [String]) in
            String(decoding: try JSONEncoder().encode(try parsed(Self.cpu + arguments, as: RunCommand.self).optionsRecord), as: UTF8.self)
        }
        #expect(try !encode(["--case", "ll-1"]).contains("maxTokens"))
        #expect(try encode(["--case", "ll-1", "--max-tokens", "8"]).contains("\"maxTokens\":8"))
    }
}
