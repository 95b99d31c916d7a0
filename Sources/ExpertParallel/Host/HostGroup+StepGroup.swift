import Foundation

/// `StepGroup` on the host: each call runs the per-rank call of every active rank at once, one
/// thread per rank (`run(ranks:)`), as R processes would; masked ranks move nothing and their
/// entries in the per-rank arrays are ignored (the arrays still hold R entries), but for the
/// expert counts a dispatch asks for, which are zeros (where the tensors fit), as is their layout
/// info: what the GPU group writes.
///
/// Every call has finished when it returns, so:
/// - `options.stream` and `options.launch` mean nothing here and are ignored;
/// - a dispatch or combine with `phase: .sendOnly` runs whole, and `complete()` only closes it:
///   as on the GPU, no other data call may come before `complete()` (`wrongOrder`), and
///   `complete()` without an open send-only call fails with `wrongOrder`. `update` has no halves
///   and ignores the phase;
/// - `checkStatus()` has nothing to find: the call that met an error threw it.
///
/// A step's ranks are those active at its update: a dispatch or combine after a rank was masked
/// or `clean` was called fails with `wrongOrder` (update the handle again) rather than waiting
/// out the timeout for a rank that no longer runs (the per-rank calls of `HostRank` behave the
/// same). A combine needs a dispatch of the handle's step first (`wrongOrder`).
///
/// Timeouts: a rank that waits past the timeout for others throws `timeout` naming them and masks
/// them; a rank that arrives late for that same call throws that timeout too (not only
/// `inactiveRank`); its later calls throw `inactiveRank` until `clean`.
///
/// Memory: a group whose per-step routing metadata (`GroupConfig.hostStepBytes`) cannot fit in
/// this host is refused at creation, and a routing with more tokens than fit at its update, with
/// `outOfMemory`; combine's scratch is a few KB whatever `hidden` is.
///
/// When ranks fail, the call throws the error of the lowest rank that failed for a reason of its
/// own (the others only report `peerFailed`), else that of the lowest failed rank. Calls through
/// this API on one group run one at a time (they share the transport's rounds); do not mix them
/// with concurrent per-rank calls (`group[r]`) on the same group.
extension HostGroup: StepGroup {
    public var localRanks: [Int] { Array(0..<config.ranks) }

    public func makeHandle() throws(EPError) -> HostGroupHandle {
        var handles: [HostHandle] = []
        for r in 0..<config.ranks { handles.append(try self[r].makeHandle()) }
        return HostGroupHandle(group: self, handles: handles)
    }

    /// Each active rank's routing, `topkIdx[r]` `[B_r, K]` int32 or int64. A rejected call voids
    /// the handle's step (dispatch and combine then fail until an update succeeds), as on the GPU.
    public func update(_ handle: HostGroupHandle, topkIdx: [TensorRef], options: CallOptions = .init()) throws(EPError) {
        try stepCall("update", .whole) { () throws(EPError) in
            let handles = try owned(handle)
            handle.forgetLayouts()
            handle.recordStep(nil)
            do throws(EPError) {
                try checkCount(topkIdx.count, "topkIdx")
            } catch {
                for h in handles { h.fail(error) }
                throw error
            }
            let active = transport.activeRanks, epoch = transport.currentEpoch
            let ranks = active.ranks.filter { $0 < config.ranks }
            _ = try Self.collect(ranks, run(ranks: ranks) { rank throws(EPError) in
                try rank.update(handles[rank.rank], topkIdx: topkIdx[rank.rank])
            })
            handle.recordStep((active, epoch))
        }
    }

    /// Moves every active rank's rows into the outputs; `layoutInfo(handle, rank:)` then returns
    /// what each rank received.
    public func dispatch(
        _ handle: HostGroupHandle, _ inputs: [DispatchInput], into outputs: [DispatchOutput],
        direction: PassDirection = .forward, options: CallOptions = .init()
    ) throws(EPError) {
        try stepCall("dispatch", options.phase) { () throws(EPError) in
            let handles = try stepHandles(handle)
            try checkCount(inputs.count, "inputs")
            try checkCount(outputs.count, "outputs")
            handle.forgetLayouts()
            let ranks = participants
            try refusingOverlaps(ranks, handles, { () throws(EPError) in try shapes.refuseOverlaps(inputs, outputs, ranks: ranks) }) { r, tokens throws(EPError) in
                try shapes.validateDispatch(inputs[r], outputs[r], tokens: tokens)
            }
            // A masked rank received nothing: its layout info and the counts it asked for are
            // zeros, as the GPU's dispatch writes them. Its count tensors are written first, where
            // they fit (its entries are otherwise ignored), so that one shared with an active
            // rank ends with that rank's counts.
            let empty = LayoutInfo.empty(checked: config)
            let masked = (0..<config.ranks).filter { !ranks.contains($0) }
            for r in masked {
                try? empty.writeCounts(experts: outputs[r].expertCounts, expertSources: outputs[r].expertSourceCounts)
            }
            let infos = try Self.collect(ranks, run(ranks: ranks) { rank throws(EPError) -> LayoutInfo in
                try rank.dispatch(handles[rank.rank], inputs[rank.rank], into: outputs[rank.rank], direction: direction)
            })
            handle.recordLayouts(infos + masked.map { _ in empty }, ranks: ranks + masked)
        }
    }

    public func combine(
        _ handle: HostGroupHandle, _ inputs: [CombineInput], into outputs: [CombineOutput],
        direction: PassDirection = .forward, options: CallOptions = .init()
    ) throws(EPError) {
        try stepCall("combine", options.phase) { () throws(EPError) in
            let handles = try stepHandles(handle)
            try checkCount(inputs.count, "inputs")
            try checkCount(outputs.count, "outputs")
            let ranks = participants
            try refusingOverlaps(ranks, handles, { () throws(EPError) in try shapes.refuseOverlaps(inputs, outputs, ranks: ranks) }) { r, tokens throws(EPError) in
                try shapes.validateCombine(inputs[r], outputs[r], tokens: tokens, direction: direction)
            }
            _ = try Self.collect(ranks, run(ranks: ranks) { rank throws(EPError) in
                try rank.combine(handles[rank.rank], inputs[rank.rank], into: outputs[rank.rank], direction: direction)
            })
        }
    }

    /// Closes the open send-only call, which already ran whole; `wrongOrder` when none is open.
    public func complete(options: CallOptions = .init()) throws(EPError) {
        let state = stepState
        state.calls.lock()
        defer { state.calls.unlock() }
        guard state.openSendOnly != nil else {
            throw .nothingToComplete
        }
        state.openSendOnly = nil
    }

    /// What rank `rank` received in the last dispatch of `handle`'s current step.
    public func layoutInfo(_ handle: HostGroupHandle, rank: Int) throws(EPError) -> LayoutInfo {
        _ = try owned(handle)
        guard rank >= 0 && rank < config.ranks else {
            throw .invalidArgument(field: "rank", value: "\(rank)", requirement: "must be in 0..<\(config.ranks) (localRanks)")
        }
        return try handle.layout(rank: rank)
    }

    /// Nothing to check: host calls throw their errors themselves.
    public func checkStatus() throws(EPError) {}

    public var activeRanks: RankMask {
        get throws(EPError) { transport.activeRanks }
    }

    public func deactivate(rank: Int) throws(EPError) {
        guard rank >= 0 && rank < config.ranks else {
            throw .invalidArgument(field: "rank", value: "\(rank)", requirement: "must be in 0..<\(config.ranks)")
        }
        try refuseWhileSendOnlyOpen()
        transport.deactivate(rank)
    }

    /// Marks `ranks` active again (ranks outside the group are ignored). Call between steps only:
    /// refused while a send-only call waits for `complete()`.
    public func clean(ranks: RankMask) throws(EPError) {
        try refuseWhileSendOnlyOpen()
        transport.clean(ranks)
    }

    /// A mask change between a send-only call and its `complete()` would change the ranks under
    /// the receiving half (on the GPU, clean also clears the flags it waits on): refused, as there.
    private func refuseWhileSendOnlyOpen() throws(EPError) {
        let state = stepState
        state.calls.lock()
        defer { state.calls.unlock() }
        if let open = state.openSendOnly { throw .sendOnlyOpen(open) }
    }

    // MARK: helpers

    /// Runs `check`, a collective call's refusal of one rank's output over another rank's
    /// argument (the ranks run at once: one's writes would race the other's reads). Where it
    /// refuses, each rank's own checks (`rankCheck(r, tokens)`) run first, in rank order: a rank's
    /// wrong shape is named as that, not as the overlap its bytes were taken to have.
    private func refusingOverlaps(
        _ ranks: [Int], _ handles: [HostHandle], _ check: () throws(EPError) -> Void, rankCheck: (Int, Int) throws(EPError) -> Void
    ) throws(EPError) {
        do {
            try check()
        } catch {
            for r in ranks {
                guard let step = try? handles[r].current() else { continue }
                try rankCheck(r, step.routing.tokens)
            }
            throw error
        }
    }

    /// Ranks that take part in a call: the active ones.
    private var participants: [Int] { transport.activeRanks.ranks.filter { $0 < config.ranks } }

    /// The handle's per-rank handles, if it is this group's and not released.
    private func owned(_ handle: HostGroupHandle) throws(EPError) -> [HostHandle] {
        guard handle.group === self else {
            throw .invalidArgument(field: "handle", value: "a handle of another group", requirement: "must come from this group's makeHandle()")
        }
        return try handle.rankHandles()
    }

    /// The handle's per-rank handles for a dispatch or combine, refused when the active ranks
    /// changed since the handle's update (a rank masked, or `clean` called): the per-rank calls
    /// would wait out the timeout for a rank that no longer runs, or, after `clean`, let a rank
    /// that missed the update move an older step's rows.
    private func stepHandles(_ handle: HostGroupHandle) throws(EPError) -> [HostHandle] {
        let handles = try owned(handle)
        if let step = handle.currentStep {
            let now = transport.activeRanks, epoch = transport.currentEpoch
            guard step.ranks == now, step.epoch == epoch else {
                let change = step.epoch != epoch ? "clean() was called" : "the active ranks went from \(step.ranks) to \(now)"
                throw .wrongOrder("\(change) since this handle's update; update it again before dispatch or combine")
            }
        }
        return handles
    }

    private func checkCount(_ count: Int, _ name: String) throws(EPError) {
        guard count == config.ranks else {
            throw .invalidArgument(field: "\(name).count", value: "\(count)", requirement: "must be ranks (\(config.ranks)): one per rank")
        }
    }

    /// Runs one call while no other call of this API runs on the group, refusing it while a
    /// send-only call waits for `complete()`; a successful send-only call stays open until then.
    private func stepCall(_ name: String, _ phase: CallPhase, _ body: () throws(EPError) -> Void) throws(EPError) {
        let state = stepState
        state.calls.lock()
        defer { state.calls.unlock() }
        if let open = state.openSendOnly { throw .sendOnlyOpen(open) }
        try checkInStep()
        try body()
        if phase == .sendOnly { state.openSendOnly = name }
    }

    /// Refuses a call of every rank at once when the active ranks have taken different numbers of
    /// rounds since the last `clean` (a per-rank call made on some ranks only): each rank's part
    /// would meet another call of its peers' and wait out the timeout, masking a rank that did
    /// nothing wrong.
    private func checkInStep() throws(EPError) {
        let epoch = transport.currentEpoch
        let ranks = participants
        let rounds = ranks.map { counters[$0].position(epoch: epoch) }
        guard let first = rounds.first, rounds.contains(where: { $0 != first }) else { return }
        let taken = zip(ranks, rounds).map { "rank \($0): \($1)" }.joined(separator: ", ")
        throw .wrongOrder(
            "the ranks' calls are out of step (rounds taken since the group was made or last cleaned: \(taken)): a per-rank call was made on some ranks without the others' matching calls; clean the group to start afresh")
    }

    /// The ranks' results in order, or the error that explains the failure: the lowest rank that
    /// failed for a reason of its own (the others only saw a peer fail), else the lowest failed.
    private static func collect<T>(_ ranks: [Int], _ results: [Result<T, EPError>]) throws(EPError) -> [T] {
        var values: [T] = []
        var failures: [EPError] = []
        for result in results {
            switch result {
            case .success(let value): values.append(value)
            case .failure(let error): failures.append(error)
            }
        }
        if let cause = failures.first(where: { if case .peerFailed = $0 { false } else { true } }) ?? failures.first {
            throw cause
        }
        return values
    }

    private var stepState: HostStepState { HostStepState.of(self) }
}

/// What the `StepGroup` calls of one host group share beyond the group's own state (a lock that
/// makes them take turns, and the open send-only call). `HostGroup`'s stored properties are
/// fixed, so this lives in a table keyed by the group, weakly: a dead group's entry is never
/// handed to a later group at the same address.
final class HostStepState: @unchecked Sendable {   // `openSendOnly` under `calls`
    let calls = NSLock()
    /// The name of the send-only call that `complete()` has not closed yet.
    var openSendOnly: String?

    private final class Entry: @unchecked Sendable {
        weak var group: HostGroup?
        let state = HostStepState()
        init(_ group: HostGroup) { self.group = group }
    }

    private static let tableLock = NSLock()
    nonisolated(unsafe) private static var table: [ObjectIdentifier: Entry] = [:]   // under `tableLock`

    static func of(_ group: HostGroup) -> HostStepState {
        tableLock.withLock {
            let key = ObjectIdentifier(group)
            if let entry = table[key], entry.group === group { return entry.state }
            table = table.filter { $0.value.group != nil }
            let entry = Entry(group)
            table[key] = entry
            return entry.state
        }
    }
}
