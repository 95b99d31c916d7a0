/// Rank `rank` of a `HostGroup`: the per-rank API on the CPU.
public struct HostRank: Rank {
    let group: HostGroup
    public let rank: Int

    public var config: GroupConfig { group.config }
    public var activeRanks: RankMask { group.transport.activeRanks }
    /// Masks `rank` inactive; a rank outside 0..<ranks is ignored (as `clean` ignores them).
    /// Ranks waiting for it in a call stop at once with `wrongOrder`; a step updated before stops
    /// there too: its dispatch and combine fail at once with `wrongOrder` (the masked rank's own
    /// with `inactiveRank`), so update again, without it, to go on.
    public func deactivate(rank: Int) { group.transport.deactivate(rank) }
    /// Marks `ranks` active again and starts a new epoch: steps updated before it are refused
    /// (`wrongOrder`) until updated again.
    public func clean(ranks: RankMask) { group.transport.clean(ranks) }

    public func makeHandle() throws(EPError) -> HostHandle { HostHandle(rank: rank) }

    public func update(_ handle: HostHandle, topkIdx: TensorRef) throws(EPError) {
        try exclusive { () throws(EPError) in
            do throws(EPError) {
                try plan(handle, topkIdx: topkIdx)
            } catch {
                if handle.rank == rank { handle.fail(error) }   // another rank's handle is not this call's to void
                throw error
            }
        }
    }

    /// Runs one call of this rank, refused (`wrongOrder`, nothing done, no round taken) while
    /// another of its calls is under way on another thread: a rank's calls take their rounds in
    /// order, so two at once would pair one with the other ranks' next call.
    func exclusive<T>(_ body: () throws(EPError) -> T) throws(EPError) -> T {
        let flag = group.calling[rank]
        guard flag.enter() else {
            throw .wrongOrder("rank \(rank) already has a call under way on another thread: a rank makes its calls one at a time (its handles take turns)")
        }
        defer { flag.leave() }
        return try body()
    }

    private func plan(_ handle: HostHandle, topkIdx: TensorRef) throws(EPError) {
        let (participants, epoch) = group.transport.snapshot
        guard participants.contains(rank) else { throw maskedRefusal(epoch: epoch) }
        let local = Result { () throws(EPError) -> RoutingTable in
            try checkOwner(handle)
            return try RoutingTable(topkIdx: topkIdx, checked: config).masked(participants, localExperts: config.localExperts)
        }
        let full = try exchange(local.map { RoutingSummary(routing: $0, checked: config) }, participants)
        let routing = try local.get()
        let keptTokens = try RoutingPlan.keptTokens(checked: config, rank: rank, routing: routing, summaries: full)
        var kept = full
        if config.algorithm == .highThroughput && config.overflow == .drop {
            kept = try exchange(.success(RoutingSummary(routing: routing, checked: config, keptTokens: keptTokens)), participants)
        }
        let plan = RoutingPlan(
            checked: config, rank: rank, routing: routing, keptTokens: keptTokens, kept: kept, full: full)
        handle.set(routing, plan, participants, epoch: epoch)
    }

    /// The handle's step, for a dispatch (`combine: false`) or a combine: refused while this rank
    /// is masked (`inactiveRank`), when the active ranks or the epoch changed since the update (a
    /// rank deactivated, or `clean` called: the step's ranks would wait for a rank that no longer
    /// runs, or let a rank that missed the update move an older step's rows), and for a combine
    /// before any dispatch of the step (`wrongOrder`).
    func step(_ handle: HostHandle, combine: Bool) throws(EPError) -> HostHandle.Step {
        try checkOwner(handle)
        let step = try handle.current()
        let (now, epoch) = group.transport.snapshot
        guard now.contains(rank) else { throw maskedRefusal(epoch: epoch) }
        guard step.participants == now, step.epoch == epoch else {
            let change = step.epoch != epoch ? "clean() was called" : "the active ranks went from \(step.participants) to \(now)"
            throw .wrongOrder("\(change) since this handle's update; update it again before dispatch or combine")
        }
        if combine, !step.dispatched {
            throw .wrongOrder("combine needs a dispatch of this handle's step first: update, dispatch, then combine")
        }
        return step
    }

    /// The error of a call this rank makes while masked: the timeout a peer met waiting for it,
    /// if this call is the one it came late for, else `inactiveRank`. Takes the call's round.
    private func maskedRefusal(epoch: Int) -> EPError {
        group.transport.refusal(of: rank, round: group.counters[rank].next(epoch: epoch))
    }

    func checkOwner(_ handle: HostHandle) throws(EPError) {
        guard handle.rank == rank else {
            throw .invalidArgument(field: "handle", value: "handle of rank \(handle.rank)", requirement: "must be rank \(rank)'s own handle")
        }
    }

    /// All-gathers this rank's payload, or its error: if any participant failed, every
    /// participant throws, so no rank goes on to write while another has rejected the step.
    /// A rank that failed posts its error and leaves without waiting for the others.
    func exchange<Payload: Sendable>(
        _ result: Result<Payload, EPError>, _ participants: RankMask
    ) throws(EPError) -> [Payload?] {
        let key = group.counters[rank].next(epoch: group.transport.currentEpoch)
        let posted: Posted<Payload> = switch result {
        case .success(let payload): .ok(payload)
        case .failure(let error): .failed(error.description)
        }
        if case .failure(let error) = result {
            _ = try? group.transport.allGather(key, rank: rank, participants: participants, payload: posted, timeout: config.timeout, wait: false)
            throw error
        }
        let all = try group.transport.allGather(key, rank: rank, participants: participants, payload: posted, timeout: config.timeout)
        for (peer, item) in all.enumerated() {
            if case .failed(let reason)? = item { throw .peerFailed(rank: rank, peer: peer, reason: reason) }
        }
        // A participant whose post in this round is not this call's (its calls went out of step
        // with this rank's: a call refused on some ranks before it reached the exchange) gives no
        // payload here: a named error, never a trap further on.
        for peer in participants.ranks where peer < all.count && all[peer] == nil {
            throw .wrongOrder(
                "rank \(peer)'s call in this round is not this call: the ranks' calls are out of step (a call was refused on some ranks before it reached the others); clean the group to start afresh")
        }
        return all.map { if case .ok(let payload)? = $0 { payload } else { nil } }
    }
}

extension HostRank {
    /// Ends a call whose ranks wrote into or read each other's buffers: returns once every
    /// participant is done with this rank's (HostTransport.finish). Takes a round like an exchange.
    func finishExchange(_ participants: RankMask) {
        let key = group.counters[rank].next(epoch: group.transport.currentEpoch)
        group.transport.finish(key, rank: rank, participants: participants)
    }
}

enum Posted<Payload: Sendable>: Sendable {
    case ok(Payload)
    case failed(String)
}
