import ArgumentParser
import ExpertParallelGPU
import Testing
@testable import ep_bench

/// An option given to a run that would do nothing with it is a usage error before anything runs,
/// naming the option, its value and why; the run ignored it without a word (a tuning knob on the
/// CPU, --timeout-ms with virtual ranks, --iterations with a drill, --fused-update with HT cases).
@Suite("ep-bench: options the run would ignore")
struct InapplicableOptionTests {
    /// `arguments` are refused (status 64) with a message holding every one of `fragments`.
    static func expectRefused(_ arguments: [String], _ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation) {
        guard let refused = refusal(arguments) else {
            Issue.record("accepted: \(arguments)", sourceLocation: sourceLocation)
            return
        }
        #expect(refused.status == usageStatus, "\(refused)", sourceLocation: sourceLocation)
        for fragment in fragments {
            #expect(refused.message.contains(fragment), "\(fragment) not in \(refused)", sourceLocation: sourceLocation)
        }
    }

    static let gpuOptions: [[String]] = [
        ["--sms", "16"], ["--sms", "16,32"], ["--pipeline-depth", "2"], ["--rows-in-flight", "4"], ["--row-pieces", "2"],
        ["--blocks-per-sm", "1"], ["--update-chunk-tokens", "64"], ["--full-grid"], ["--serial-launches"], ["--fused-update"],
        ["--no-fused-update"],
    ]

    /// The CPU backend runs no kernels: the knobs were checked, then ignored (--sms alone was refused,
    /// without its value).
    @Test("a GPU option with --backend cpu", arguments: gpuOptions)
    func gpuOptionOnTheCPU(option: [String]) {
        Self.expectRefused(["--backend", "cpu", "--case", "ll-1"] + option,
                           [option.joined(separator: " "), "applies to the GPU backend", "this run uses --backend cpu"])
        // --backend auto may find a GPU: accepted until it looks.
        #expect(refusal(["--case", "ll-1"] + option) == nil, "\(option)")
    }

    @Test("several GPU options with --backend cpu are named together")
    func gpuOptionsOnTheCPU() {
        Self.expectRefused(["--backend", "cpu", "--pipeline-depth", "2", "--full-grid"],
                           ["--pipeline-depth 2 and --full-grid apply to the GPU backend"])
    }

    /// `--backend auto` that found no GPU refuses them as `--backend cpu` does, before any case runs.
    @Test("a GPU option when --backend auto found no GPU", arguments: gpuOptions)
    func gpuOptionWithoutAGPU(option: [String]) throws {
        let command = try parsed(["--case", "ll-1", "--iterations", "1", "--warmup", "0"] + option, as: RunCommand.self)
        do {
            try command.runOnCPU()
            Issue.record("the CPU run went on with \(option)")
        } catch let error as ValidationError {
            #expect(error.message.contains("\(option.joined(separator: " ")) applies to the GPU backend"), "\(error)")
            #expect(error.message.contains("--backend auto found no GPU"), "\(error)")
        }
    }

    /// NCCL's options with virtual ranks (on either backend).
    @Test("an NCCL option with --transport virtual", arguments: [
        ["--sharing", "ipc"], ["--timeout-ms", "500"], ["--drill", "dies"], ["--drill", "never-joins"],
    ])
    func ncclOptionWithVirtualRanks(option: [String]) {
        let expected = [option.joined(separator: " "), "applies to --transport nccl", "--transport virtual"]
        Self.expectRefused(option, expected)
        Self.expectRefused(["--backend", "cpu", "--transport", "virtual"] + option, expected)
        #expect(refusal(["--transport", "nccl"] + option) == nil, "\(option)")
    }

    @Test("--drill-rank without --drill")
    func drillRankWithoutDrill() {
        Self.expectRefused(["--transport", "nccl", "--drill-rank", "0"], ["--drill-rank 0 applies to --drill"])
        Self.expectRefused(["--drill-rank", "1"], ["--drill-rank 1 applies to --drill"])
    }

    /// A drill runs one untimed ll-std step: the cases' shape, timing, tuning and outputs do nothing
    /// there (--sms and --fp8 were refused already).
    @Test("an option a drill ignores", arguments: [
        ["--case", "ll-1"], ["--tokens", "4"], ["--hidden", "64"], ["--topk", "2"], ["--experts", "16"],
        ["--layout", "rank-major"], ["--dtype", "f16"], ["--dtype", "bf16"], ["--iterations", "3"], ["--warmup", "0"],
        ["--skew", "1.0"], ["--seed", "7"], ["--progress"], ["--pipeline-depth", "2"], ["--full-grid"], ["--fused-update"],
        ["--sms", "16"], ["--fp8", "ue8m0"],
    ])
    func drillIgnores(option: [String]) {
        Self.expectRefused(["--transport", "nccl", "--drill", "dies"] + option,
                           [option.joined(separator: " "), "applies to the cases' timed runs", "--drill dies"])
    }

    @Test("a drill's outputs and its padded layout")
    func drillIgnoresOutputs() throws {
        let folder = try TemporaryFolder()
        let drill = ["--transport", "nccl", "--drill", "never-joins"]
        Self.expectRefused(drill + ["--json", try folder.file("d.json")], ["--json \(folder.path)/d.json", "--drill never-joins"])
        Self.expectRefused(drill + ["--plot", try folder.file("d.svg")], ["--plot \(folder.path)/d.svg", "--drill never-joins"])
        Self.expectRefused(drill + ["--layout", "expert-major-padded", "--alignment", "4"],
                           ["--layout expert-major-padded and --alignment 4 apply", "--drill never-joins"])
        // What a drill takes.
        #expect(refusal(drill + ["--ranks", "4", "--drill-rank", "3", "--timeout-ms", "2000", "--sharing", "ipc", "--backend", "gpu"]) == nil)
    }

    /// NCCL ranks launch plainly (no dependent launches yet) and print no progress lines.
    @Test("--serial-launches and --progress with --transport nccl")
    func ncclIgnores() {
        Self.expectRefused(["--transport", "nccl", "--serial-launches"], ["--serial-launches applies to virtual ranks", "--transport nccl"])
        Self.expectRefused(["--transport", "nccl", "--progress"], ["--progress applies to --transport virtual"])
        #expect(refusal(["--backend", "gpu", "--serial-launches", "--progress"]) == nil)
        #expect(refusal(["--backend", "cpu", "--progress"]) == nil)
    }

    /// --fused-update is LL's, --update-chunk-tokens HT's: refused where the GPU's cases have none
    /// of that algorithm (odd has both; --layout picks one of its variants).
    @Test("an option of the other algorithm")
    func otherAlgorithm() {
        Self.expectRefused(["--backend", "gpu", "--case", "ht-std", "--fused-update"], ["--fused-update applies to LL cases", "ht-std"])
        Self.expectRefused(["--transport", "nccl", "--case", "ht-4k", "--no-fused-update"], ["--no-fused-update applies to LL cases"])
        Self.expectRefused(["--backend", "gpu", "--case", "odd", "--layout", "flat", "--fused-update"], ["--fused-update", "(odd) are HT"])
        Self.expectRefused(["--backend", "gpu", "--case", "ll-1", "--case", "ll-std", "--update-chunk-tokens", "64"],
                           ["--update-chunk-tokens 64 applies to HT cases", "(ll-std, ll-1) are LL"])
        Self.expectRefused(["--transport", "nccl", "--update-chunk-tokens", "64", "--layout", "rank-major"], ["--update-chunk-tokens 64"])
        for accepted in [["--backend", "gpu", "--case", "odd", "--fused-update", "--update-chunk-tokens", "64"],
                         ["--backend", "gpu", "--update-chunk-tokens", "64"],   // the GPU's defaults hold odd's HT variant
                         ["--transport", "nccl", "--fused-update", "--update-chunk-tokens", "64"],
                         ["--backend", "gpu", "--case", "ll-1", "--case", "ht-std", "--no-fused-update"]] {
            #expect(refusal(accepted) == nil, "\(accepted)")
        }
    }

    /// u8 is dispatch only: no combine runs for --rows-in-flight to tune.
    @Test("--rows-in-flight with --dtype u8")
    func rowsInFlightWithoutCombine() {
        Self.expectRefused(["--backend", "gpu", "--dtype", "u8", "--rows-in-flight", "4"], ["--rows-in-flight 4 applies to combine", "--dtype u8"])
        #expect(refusal(["--backend", "gpu", "--dtype", "u8", "--pipeline-depth", "2"]) == nil)
        #expect(refusal(["--backend", "gpu", "--dtype", "f16", "--rows-in-flight", "4"]) == nil)
    }

    /// Under mpirun or torchrun (an id file) each rank prints result lines: nobody writes --json or
    /// --plot, and the job's size, not --ranks, is the ranks. The ranks ep-bench spawns (an id in
    /// their environment) get its whole command line.
    @Test("a rank of an mpirun or torchrun job")
    func launchedRank() throws {
        let folder = try TemporaryFolder()
        let job = NCCLRankEnvironment(rank: 0, world: 2, deviceOrdinal: 0, idHex: nil, idFile: "\(folder.path)/id")
        let spawned = NCCLRankEnvironment(rank: 0, world: 2, deviceOrdinal: 0, idHex: "00", idFile: nil)
        let json = try folder.file("r.json")
        for (arguments, expected) in [(["--json", json], "--json \(json) applies to the ranks ep-bench spawns"),
                                      (["--ranks", "4"], "--ranks 4 is not this job's 2 ranks")] {
            let command = try parsed(["--transport", "nccl"] + arguments, as: RunCommand.self)
            do {
                try command.checkLaunchedRank(job)
                Issue.record("accepted at a rank of a job: \(arguments)")
            } catch let error as ValidationError {
                #expect(error.message.contains(expected), "\(error)")
            }
            try command.checkLaunchedRank(spawned)
            try command.checkLaunchedRank(nil)
        }
        try parsed(["--transport", "nccl", "--ranks", "2"], as: RunCommand.self).checkLaunchedRank(job)
    }

    /// No options, and every command line of docs/ep-bench.md and scripts/device-verify, still parse.
    @Test("the defaults and the documented command lines")
    func documented() throws {
        let folder = try TemporaryFolder()
        let json = try folder.file("b.json", "[]"), svg = try folder.file("b.svg")
        let lines: [[String]] = [
            [], ["run"], ["--backend", "cpu"], ["--backend", "gpu"], ["--transport", "nccl"],
            // (64 tokens: ht-std's own 4096 need about 30 GiB of host memory, which a small machine refuses.)
            ["--case", "ht-std", "--layout", "expert-major-padded", "--alignment", "128", "--dtype", "f16", "--tokens", "64"],
            ["--case", "custom", "--tokens", "64", "--hidden", "2048", "--topk", "4", "--experts", "32", "--ranks", "4", "--layout", "flat"],
            ["--backend", "gpu", "--case", "ll-std", "--case", "ht-std", "--sms", "16,32,66,132", "--json", json],
            ["--backend", "gpu", "--case", "ll-std", "--tokens", "1,8,32,128,512", "--json", json, "--plot", svg],
            ["plot", "--json", json, "--out", svg],
            ["run", "--backend", "gpu", "--ranks", "1", "--case", "ll-std", "--case", "ll-1", "--case", "ht-std", "--iterations", "200"],
            ["run", "--backend", "gpu", "--case", "ht-std", "--fp8", "float32", "--fp8-source", "pass-through", "--iterations", "50"],
            ["run", "--transport", "nccl", "--ranks", "2", "--layout", "expert-major-padded", "--alignment", "16", "--case", "ht-std", "--case", "ht-4k"],
            ["run", "--transport", "nccl", "--ranks", "2", "--sms", "16", "--case", "ht-std", "--case", "ht-4k", "--iterations", "50"],
            ["run", "--transport", "nccl", "--ranks", "2", "--fused-update", "--case", "ll-std", "--case", "ll-1", "--iterations", "200"],
            ["run", "--transport", "nccl", "--ranks", "2", "--skew", "1", "--case", "ll-std", "--case", "ht-std"],
            ["run", "--transport", "nccl", "--ranks", "2", "--drill", "dies", "--drill-rank", "1", "--timeout-ms", "2000"],
            ["run", "--backend", "gpu", "--serial-launches", "--full-grid", "--pipeline-depth", "2", "--rows-in-flight", "4"],
        ]
        for arguments in lines { #expect(refusal(arguments) == nil, "\(arguments)") }
    }
}
