import ArgumentParser
import ExpertParallelGPU
import Testing
@testable import ep_bench

/// A rank of an mpirun or torchrun job runs every case with R = the job's size: a case whose
/// experts that size does not divide cannot run. It was left out without a word, also when named
/// with --case (a job of 3 ranks given `--case ll-std` printed no row and exited 0).
@Suite("ep-bench: the cases of an NCCL job")
struct NCCLJobCaseTests {
    static func command(_ arguments: [String]) throws -> RunCommand {
        try parsed(["run", "--transport", "nccl"] + arguments)
    }

    /// The message of the usage error `casesOfJob(world:rank:)` raises for `arguments`, or nil when it accepts them.
    static func refusal(_ arguments: [String], world: Int) throws -> String? {
        do {
            _ = try command(arguments).casesOfJob(world: world, rank: 0)
            return nil
        } catch let error as ValidationError {
            return error.message
        }
    }

    @Test("a case named with --case that the job's size cannot run is a usage error naming it")
    func namedCase() throws {
        #expect(try Self.refusal(["--case", "ll-std"], world: 3)
                == "--case ll-std: its 256 experts are not a multiple of this job's 3 NCCL ranks")
        #expect(try Self.refusal(["--case", "ll-1", "--case", "odd"], world: 64)
                == "--case odd: its 96 experts are not a multiple of this job's 64 NCCL ranks")
        #expect(try Self.refusal(["--case", "ll-1", "--case", "odd"], world: 32) == nil)
    }

    /// With --experts every case has that many experts: the value the job's size does not divide
    /// is --experts's, but the error named --case (or, without --case, asked to give --experts).
    @Test("--experts that the job's size does not divide is a usage error naming --experts")
    func experts() throws {
        let expected = "--experts 256 is not a multiple of this job's 3 NCCL ranks"
        #expect(try Self.refusal(["--case", "ll-std", "--experts", "256"], world: 3) == expected)
        #expect(try Self.refusal(["--case", "ll-1", "--case", "ht-std", "--experts", "256"], world: 3) == expected)
        #expect(try Self.refusal(["--experts", "256"], world: 3) == expected)
        #expect(try Self.refusal(["--case", "ll-std", "--experts", "96"], world: 3) == nil)
        let job = NCCLRankEnvironment(rank: 1, world: 3, deviceOrdinal: 1, idHex: nil, idFile: "/tmp/ep-bench-unused-id")
        #expect(performing: { try Self.command(["--case", "ll-std", "--experts", "256"]).checkLaunchedRank(job) },
                throws: { ($0 as? ValidationError)?.message == expected })
    }

    @Test("default cases: kept with R = the job's size, or, where its size runs none of them, a usage error")
    func defaultCases() throws {
        let kept = try Self.command([]).casesOfJob(world: 4, rank: 1)
        #expect(kept.map(\.name) == ["ll-std", "ll-32", "ll-1", "ht-std"])
        #expect(kept.allSatisfy { $0.ranks == 4 })
        let none = try #require(try Self.refusal([], world: 3))
        #expect(none.hasPrefix("none of the cases (ll-std, ll-32, ll-1, ht-std) has experts a multiple of this job's 3 NCCL ranks"), "\(none)")
        #expect(try Self.refusal(["--experts", "96"], world: 3) == nil)   // --experts makes them runnable
    }

    /// The refusal comes from `validate()` (checkLaunchedRank), before the rank opens its GPU, joins
    /// the job's communicator and measures its copy bandwidth: runNCCL asked only after all that.
    @Test("refused before the rank joins the job")
    func refusedBeforeJoining() throws {
        let job = NCCLRankEnvironment(rank: 1, world: 3, deviceOrdinal: 1, idHex: nil, idFile: "/tmp/ep-bench-unused-id")
        for arguments in [["--case", "ll-std"], []] {
            #expect(throws: ValidationError.self, "\(arguments)") { try Self.command(arguments).checkLaunchedRank(job) }
        }
        try Self.command(["--experts", "96"]).checkLaunchedRank(job)
        try Self.command(["--drill", "dies"]).checkLaunchedRank(job)   // a drill runs no cases
        // The ranks ep-bench spawns are the --ranks their launcher checked.
        try Self.command(["--case", "ll-std"]).checkLaunchedRank(NCCLRankEnvironment(rank: 1, world: 3, deviceOrdinal: 1, idHex: "00", idFile: nil))
    }
}
