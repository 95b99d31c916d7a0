/// Rank `rank` of a `HostGroup`: the per-rank API on the CPU.
public struct HostRank: Rank {
    let group: HostGroup
    public let rank: Int

    public var config: GroupConfig { group.config }
    public var activeRanks: RankMask { group.transport.activeRanks }
    public func deactivate(rank: Int) { group.transport.deactivate(rank) }
    public func clean(ranks: RankMask) { group.transport.clean(ranks) }

    public func makeHandle() throws(EPError) -> HostHandle { HostHandle(rank: rank) }

    public func update(_ handle: HostHandle, topkIdx: TensorRef) throws(EPError) {
        do {
            try plan(handle, topkIdx: topkIdx)
        } catch {
            if handle.rank == rank { handle.fail(error) }   // another rank's handle is not this call's to void
            throw error
        }
    }

    private func plan(_ handle: HostHandle, topkIdx: TensorRef) throws(EPError) {
        let participants = group.transport.activeRanks
        guard participants.contains(rank) else { throw .inactiveRank(rank) }
        let local = Result { () throws(EPError) -> RoutingTable in
            try checkOwner(handle)
            return try RoutingTable(topkIdx: topkIdx, config: config).masked(participants, localExperts: config.localExperts)
        }
        let full = try exchange(local.map { RoutingSummary(routing: $0, config: config) }, participants)
        let routing = try local.get()
        let keptTokens = try RoutingPlan.keptTokens(config: config, rank: rank, routing: routing, summaries: full)
        var kept = full
        if config.algorithm == .highThroughput && config.overflow == .drop {
            kept = try exchange(.success(RoutingSummary(routing: routing, config: config, keptTokens: keptTokens)), participants)
        }
        let plan = RoutingPlan(
            config: config, rank: rank, routing: routing, keptTokens: keptTokens, kept: kept, full: full)
        handle.set(routing, plan, participants)
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
        return all.map { if case .ok(let payload)? = $0 { payload } else { nil } }
    }
}

enum Posted<Payload: Sendable>: Sendable {
    case ok(Payload)
    case failed(String)
}
