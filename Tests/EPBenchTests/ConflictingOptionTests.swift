import Testing
@testable import ep_bench

/// Options that do not fit together are usage errors before anything runs, naming both.
@Suite("ep-bench: options that do not fit together")
struct ConflictingOptionTests {
    /// NCCL ranks are GPU processes: with --backend cpu the run went on to load NCCL and failed
    /// with status 1 (or ran on the GPUs where NCCL was found), the --backend ignored.
    @Test("--transport nccl with --backend cpu")
    func ncclOnTheCPU() throws {
        for arguments in [["--backend", "cpu", "--transport", "nccl"], ["--transport", "nccl", "--case", "ll-1", "--backend", "cpu"],
                          ["--backend", "cpu", "--transport", "nccl", "--drill", "dies"]] {
            let refused = try #require(refusal(arguments), "\(arguments)")
            #expect(refused.status == usageStatus, "\(refused)")
            #expect(refused.message.contains("--transport nccl") && refused.message.contains("--backend cpu"), "\(refused)")
        }
        #expect(refusal(["--backend", "gpu", "--transport", "nccl"]) == nil)
        #expect(refusal(["--transport", "nccl"]) == nil)
    }

    /// A drill needs a rank to fail and another to report it; its step is ll-std's, whose 256
    /// experts the ranks must divide. With one rank the launcher's verdict had nobody to judge
    /// and passed; with 3 every rank failed to build its group, reported as a failed drill.
    @Test("--drill with ranks it cannot run on", arguments: [
        (["--ranks", "1", "--drill-rank", "0"], "--ranks 1", "at least 2"),
        (["--ranks", "3"], "--ranks 3", "256"),
        (["--ranks", "64"], "--ranks 64", "32"),
    ])
    func drillRanks(extra: [String], value: String, bound: String) throws {
        let refused = try #require(refusal(["--transport", "nccl", "--drill", "dies"] + extra))
        #expect(refused.status == usageStatus, "\(refused)")
        #expect(refused.message.contains(value) && refused.message.contains(bound), "\(refused)")
    }

    @Test("a drill with ranks it can run on")
    func drillAccepted() {
        #expect(refusal(["--transport", "nccl", "--drill", "dies"]) == nil)
        #expect(refusal(["--transport", "nccl", "--drill", "never-joins", "--ranks", "4", "--drill-rank", "3"]) == nil)
    }
}
