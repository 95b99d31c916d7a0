import Foundation

/// The in-memory transport of a host group: ranks meet only here, by all-gathering one payload
/// each per round. Every wait is bounded by the group's timeout; a rank that does not arrive in
/// time is masked inactive, so nothing waits forever.
final class HostTransport: @unchecked Sendable {
    private let condition = NSCondition()
    private let ranks: Int
    private var mask: RankMask
    /// Bumped by `clean`, so ranks that fell out of step start counting rounds afresh.
    private var epoch = 0
    private var posted: [RoundKey: [Int: any Sendable]] = [:]
    private var readers: [RoundKey: Int] = [:]
    /// Ranks masked because a peer waited past the timeout for them (until `clean`): the round
    /// they missed and the timeout the waiting rank met, which the late rank reports when it
    /// arrives for that round (rather than only "masked inactive").
    private var timedOut: [Int: (key: RoundKey, error: EPError)] = [:]

    struct RoundKey: Hashable { var epoch: Int, round: Int }

    init(ranks: Int) {
        self.ranks = ranks
        mask = .all(ranks)
    }

    var activeRanks: RankMask { condition.withLock { mask } }
    var currentEpoch: Int { condition.withLock { epoch } }
    /// The mask and the epoch, read together.
    var snapshot: (mask: RankMask, epoch: Int) { condition.withLock { (mask, epoch) } }

    /// Masks `rank` inactive (a rank outside the group is ignored). Ranks waiting for it in a
    /// call stop waiting at once (`wrongOrder`), rather than at the timeout.
    func deactivate(_ rank: Int) {
        guard rank >= 0 && rank < ranks else { return }
        condition.withLock {
            mask.remove(rank)
            condition.broadcast()
        }
    }

    /// Why masked `rank` may not take part in round `key`: the timeout a peer met waiting for
    /// it in that very round (it came late for it), else `inactiveRank`.
    func refusal(of rank: Int, round key: RoundKey) -> EPError {
        condition.withLock {
            if let late = timedOut[rank], late.key == key { return late.error }
            return .inactiveRank(rank)
        }
    }

    /// Marks `ranks` active again and restarts round numbering. Call it between steps only.
    func clean(_ cleaned: RankMask) {
        condition.withLock {
            mask.bits |= cleaned.bits & RankMask.all(ranks).bits
            epoch += 1
            posted.removeAll()
            readers.removeAll()
            timedOut.removeAll()
            condition.broadcast()
        }
    }

    /// Posts `payload` for `rank` and returns every participant's payload, indexed by rank.
    /// With `wait: false` it only posts (a rank that rejected its call tells the others and
    /// leaves at once) and returns nothing.
    func allGather<Payload: Sendable>(
        _ key: RoundKey, rank: Int, participants: RankMask, payload: Payload, timeout: Duration, wait: Bool = true
    ) throws(EPError) -> [Payload?] {
        let deadline = Date().addingTimeInterval(timeout.seconds)
        condition.lock()
        defer { condition.unlock() }
        guard mask.contains(rank) else {
            // Late for a round a peer gave up on: the cause is that peer's timeout.
            if let late = timedOut[rank], late.key == key { throw late.error }
            throw .inactiveRank(rank)
        }
        posted[key, default: [:]][rank] = payload
        condition.broadcast()
        if !wait {
            finishReading(key, participants)
            return []
        }
        while true {
            let arrived = posted[key] ?? [:]
            let missing = participants.ranks.filter { arrived[$0] == nil }
            if missing.isEmpty { break }
            // A peer masked while this rank waits for it will not come: stop now.
            let gone = missing.filter { !mask.contains($0) }
            if !gone.isEmpty {
                let timedOutPeers = gone.filter { timedOut[$0] != nil }
                if !timedOutPeers.isEmpty { throw .timeout(rank: rank, missing: timedOutPeers) }
                throw .wrongOrder(
                    "rank(s) \(gone) were masked inactive (deactivate) while rank \(rank) waited for them in this call; "
                    + "a step's ranks are those active at its update: update the handle again")
            }
            if !condition.wait(until: deadline) && Date() >= deadline {
                // A post that came as the wait ran out still counts: a rank that saw every post
                // goes on to use this rank's buffers, so this rank must not give up on it.
                let late = posted[key] ?? [:]
                let missing = participants.ranks.filter { late[$0] == nil }
                if missing.isEmpty { break }
                let error = EPError.timeout(rank: rank, missing: missing)
                for peer in missing {
                    mask.remove(peer)
                    timedOut[peer] = (key, error)
                }
                condition.broadcast()
                throw error
            }
        }
        let arrived = posted[key]!
        finishReading(key, participants)
        return (0..<ranks).map { participants.contains($0) ? arrived[$0] as? Payload : nil }
    }

    /// The barrier that ends a call whose ranks wrote into or read each other's buffers: posts
    /// for `rank` (masked or not) and waits for every participant, with no deadline. Each
    /// participant comes here straight from an exchange every participant passed, and waits for
    /// no one on the way, so each arrives; a rank that left on a timeout instead could have its
    /// buffers freed while a slower peer still wrote into them (seen as heap corruption on a
    /// loaded 16-core host). A `clean` meanwhile (between steps only) ends the wait.
    func finish(_ key: RoundKey, rank: Int, participants: RankMask) {
        condition.lock()
        defer { condition.unlock() }
        let started = epoch
        posted[key, default: [:]][rank] = true
        condition.broadcast()
        while epoch == started, participants.ranks.contains(where: { posted[key]?[$0] == nil }) { condition.wait() }
        if epoch == started { finishReading(key, participants) }
    }

    /// The last participant done with a round frees it. Call with the lock held.
    private func finishReading(_ key: RoundKey, _ participants: RankMask) {
        readers[key, default: 0] += 1
        if readers[key] == participants.count {
            posted[key] = nil
            readers[key] = nil
        }
    }
}

extension Duration {
    /// The duration in seconds, as a Double: for a whole number of nanoseconds (every timeout),
    /// the nanoseconds divided by 1e9, one rounding, so that a timeout set as 0.3 s reads 0.3
    /// (adding the attoseconds times 1e-18 gave 0.30000000000000004).
    package var seconds: Double {
        let (s, atto) = components
        let (whole, fraction) = atto.quotientAndRemainder(dividingBy: 1_000_000_000)
        let (scaled, overflow) = s.multipliedReportingOverflow(by: 1_000_000_000)
        if fraction == 0, !overflow, case let (ns, false) = scaled.addingReportingOverflow(whole), ns.magnitude < 1 << 53 {
            return Double(ns) / 1e9
        }
        return Double(s) + Double(atto) / 1e18
    }
}
