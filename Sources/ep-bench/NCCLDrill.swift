import ArgumentParser
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation

extension PeerSharing: ExpressibleByArgument {}

/// A rank that fails on purpose, to show that the others neither hang nor go on blind: they
/// finish within the timeout, name the missing rank in the mask (or fail to join, naming the
/// timeout) and report the error.
enum FailureDrill: String, ExpressibleByArgument, CaseIterable {
    /// The failing rank exits before it joins the communicator.
    case neverJoins = "never-joins"
    /// The failing rank joins and builds the group, then exits before the first step; the others
    /// report it, then run one more step without it, checked against the CPU oracle with that
    /// rank masked.
    case dies

    static let prefix = "EPDRILL "
    /// The case whose step a drill runs, with R = the ranks.
    static var step: BenchCase { BenchCase.standard.first { $0.name == "ll-std" }! }
    static let failingStatus: Int32 = 3

    struct Report: Codable {
        var rank: Int
        var seconds: Double
        var error: String?
        var mask: UInt64?
        /// `dies`: the next step ran without the failed rank and matched the oracle.
        var continued: Bool?
        var continueError: String?
    }

    /// One rank's part: fail as asked, or try a step of `ll-std` and report what happened.
    func act(
        rank me: NCCLRankEnvironment, failing: Int, nccl: NCCLLibrary, id: NCCLUniqueID, device: GPUDevice,
        sharing: PeerSharing, timeout: Duration
    ) throws {
        if me.rank == failing && self == .neverJoins { leave(me.rank, "before joining") }
        let clock = ContinuousClock()
        let start = clock.now
        var report = Report(rank: me.rank, seconds: 0)
        do {
            let comm = try nccl.initRank(ranks: me.world, id: id, rank: me.rank, timeout: timeout)
            defer { try? nccl.abort(comm) }
            let benchCase = Self.step.with(ranks: me.world)
            var config = benchCase.config()
            config.timeout = timeout
            config = try config.validated()
            let group = try NCCLRankGroup(config, device: device, comm: comm, nccl: nccl, sharing: sharing)
            if me.rank == failing { leave(me.rank, "after the group was built") }
            let data = try BenchData(config: config, tokens: benchCase.tokens, seed: 1, skew: 0)
            let step = try NCCLStep(group: group, data: data, rank: me.rank)
            try step.enqueue()
            report.mask = try group.activeRanks.bits
            do {
                try group.checkStatus()
            } catch {
                report.error = "\(error)"
            }
            if self == .dies {
                // The failed rank is out of the mask: the next step goes on without it.
                do {
                    try step.enqueue()
                    try group.checkStatus()
                    report.continued = try step.combinedRows().bytes() == (try data.oracleCombined(config: config, without: [failing]))[me.rank]
                } catch {
                    report.continued = false
                    report.continueError = "\(error)"
                }
            }
        } catch {
            report.error = "\(error)"
        }
        report.seconds = (clock.now - start).seconds
        print(Self.prefix + String(decoding: try JSONEncoder().encode(report), as: UTF8.self))
    }

    private func leave(_ rank: Int, _ when: String) -> Never {
        print("rank \(rank) leaves \(when) (drill \(rawValue))")
        fflush(nil)
        exit(Self.failingStatus)
    }

    /// The launcher's verdict: the failing rank left, every other rank reported an error in
    /// time, and (for `dies`) its mask no longer holds the failing rank.
    func judge(_ children: [(status: Int32, output: String)], failing: Int, timeout: Duration) throws {
        var problems: [String] = []
        let limit = 2 * timeout.seconds + 5
        for (rank, child) in children.enumerated() {
            if rank == failing {
                if child.status != Self.failingStatus { problems.append("rank \(rank) should have left with status \(Self.failingStatus), got \(child.status)") }
                continue
            }
            guard let line = child.output.split(separator: "\n").first(where: { $0.hasPrefix(Self.prefix) }),
                let report = try? JSONDecoder().decode(Report.self, from: Data(line.dropFirst(Self.prefix.count).utf8))
            else {
                problems.append("rank \(rank) (status \(child.status)) printed no report")
                continue
            }
            let mask = report.mask.map { RankMask(bits: $0).description } ?? "none"
            let next = report.continued.map { $0 ? ", next step without rank \(failing): matches the oracle" : ", next step: FAILED" } ?? ""
            print("rank \(rank): \(format(report.seconds, 2)) s, mask \(mask), error: \(report.error ?? "none")\(next)")
            if report.error == nil { problems.append("rank \(rank) reported no error") }
            if report.seconds > limit { problems.append("rank \(rank) took \(format(report.seconds, 2)) s, more than \(format(limit, 1)) s") }
            if child.status != 0 { problems.append("rank \(rank) reported, then exited with status \(child.status)") }
            if self == .neverJoins, !(report.error ?? "").contains("to join") {
                problems.append("rank \(rank)'s error is not the join timeout: \(report.error ?? "none")")
            }
            if self == .dies {
                guard let bits = report.mask else { problems.append("rank \(rank) reported no mask"); continue }
                if bits & (UInt64(1) << UInt64(failing)) != 0 { problems.append("rank \(rank)'s mask still holds rank \(failing)") }
                if bits & (UInt64(1) << UInt64(rank)) == 0 { problems.append("rank \(rank)'s mask dropped itself") }
                if report.continued != true {
                    problems.append("rank \(rank)'s next step without rank \(failing) \(report.continueError.map { "failed: \($0)" } ?? "differs from the oracle")")
                }
            }
        }
        if !problems.isEmpty { throw RunFailure("drill \(rawValue) failed: " + problems.joined(separator: "; ")) }
        print("drill \(rawValue): rank \(failing) failed; the others reported it within \(format(limit, 1)) s")
    }
}
