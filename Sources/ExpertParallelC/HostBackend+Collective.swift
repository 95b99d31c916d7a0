import CExpertParallel
import ExpertParallel

/// The collective calls on the host group: each runs the R ranks' calls concurrently (one
/// thread per rank, `HostGroup.run`), as R processes would, and reports one status. Every call
/// completes before it returns, so there is no stream to wait for and nothing to check later.
extension HostBackend: GroupBackend {
    var config: GroupConfig { group.config }
    var kind: epBackend_t { epBackendHost }

    /// Ranks that take part in a call: the active ones. Masked ranks do nothing.
    var participants: [Int] { group[0].activeRanks.ranks.filter { $0 < config.ranks } }

    func updateAll(_ inputs: [epUpdateInputs_t], _ settings: CallSettings, _ stream: UnsafeMutableRawPointer?) throws {
        let ranks = participants
        var routing: [Int: TensorRef] = [:]
        for r in ranks { routing[r] = try TensorDescriptor.tensor(inputs[r].topkIdx, "inputs[\(r)].topkIdx") }
        let handles = self.handles, arguments = routing
        _ = try Self.collect(ranks, group.run(ranks: ranks) { rank throws(EPError) in
            try rank.update(handles[rank.rank], topkIdx: try Self.argument(arguments, rank.rank))
        })
    }

    func dispatchAll(
        _ inputs: [epDispatchInputs_t], _ outputs: [epDispatchOutputs_t], _ settings: CallSettings,
        _ stream: UnsafeMutableRawPointer?
    ) throws {
        let ranks = participants
        var arguments: [Int: (DispatchInput, DispatchOutput)] = [:]
        var destinations: [Int: LayoutInfoDestination] = [:]
        for r in ranks {
            arguments[r] = (try DispatchInput(inputs[r], "inputs[\(r)]"), try DispatchOutput(outputs[r], "outputs[\(r)]"))
            destinations[r] = try LayoutInfoDestination(outputs[r].layoutInfo, "outputs[\(r)].layoutInfo")
        }
        let handles = self.handles, calls = arguments, direction = settings.direction
        let infos = try Self.collect(ranks, group.run(ranks: ranks) { rank throws(EPError) -> LayoutInfo in
            let (input, output) = try Self.argument(calls, rank.rank)
            return try rank.dispatch(handles[rank.rank], input, into: output, direction: direction)
        })
        lastLayout = Array(repeating: nil, count: config.ranks)
        for (r, info) in zip(ranks, infos) {
            lastLayout[r] = info
            destinations[r]?.fill(info)
        }
    }

    func combineAll(
        _ inputs: [epCombineInputs_t], _ outputs: [epCombineOutputs_t], _ settings: CallSettings,
        _ stream: UnsafeMutableRawPointer?
    ) throws {
        let ranks = participants
        var arguments: [Int: (CombineInput, CombineOutput)] = [:]
        for r in ranks {
            arguments[r] = (try CombineInput(inputs[r], "inputs[\(r)]"), try CombineOutput(outputs[r], "outputs[\(r)]"))
        }
        let handles = self.handles, calls = arguments, direction = settings.direction
        _ = try Self.collect(ranks, group.run(ranks: ranks) { rank throws(EPError) in
            let (input, output) = try Self.argument(calls, rank.rank)
            try rank.combine(handles[rank.rank], input, into: output, direction: direction)
        })
    }

    func checkStatus() {}

    func layoutInfo(rank: Int) throws -> LayoutInfo {
        guard let info = lastLayout[rank] else {
            throw EPError.wrongOrder("rank \(rank) has no layout info: it took part in no collective dispatch yet, or was masked in the last one")
        }
        return info
    }

    func activeRanks() -> RankMask { group[0].activeRanks }
    func deactivate(rank: Int) { group[0].deactivate(rank: rank) }
    func clean(ranks: RankMask) { group[0].clean(ranks: ranks) }

    /// A rank's arguments; every running rank has them (checked before the ranks start).
    private static func argument<T>(_ arguments: [Int: T], _ rank: Int) throws(EPError) -> T {
        guard let value = arguments[rank] else { throw .wrongOrder("rank \(rank) was started without arguments") }
        return value
    }

    /// The ranks' results, or the error that explains the failure: the lowest rank that failed
    /// for a reason of its own (the others only saw a peer fail).
    private static func collect<T>(_ ranks: [Int], _ results: [Result<T, EPError>]) throws -> [T] {
        var failures: [RankFailure] = []
        var values: [T] = []
        for (r, result) in zip(ranks, results) {
            switch result {
            case .success(let value): values.append(value)
            case .failure(let error): failures.append(RankFailure(rank: r, error: error))
            }
        }
        let cause = failures.first { if case .peerFailed = $0.error { false } else { true } } ?? failures.first
        if let cause { throw cause }
        guard values.count == ranks.count else {
            throw InternalError(message: "\(values.count) results for \(ranks.count) ranks")
        }
        return values
    }
}
