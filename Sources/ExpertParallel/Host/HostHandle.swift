import Foundation

/// One rank's per-step state on the host backend: the routing of the last update and the plan
/// derived from it. A failed update clears it, as the GPU backends void a failed step: dispatch
/// and combine then fail until an update succeeds, instead of moving the previous step's rows.
public final class HostHandle: @unchecked Sendable {
    public let rank: Int
    private let lock = NSLock()
    private var state: Step?
    private var failure: String?

    /// What a successful update leaves: the routing, the plan, the ranks active at the update and
    /// the transport epoch then (a later `clean` starts a new one), and whether a dispatch of the
    /// step has completed (combine needs one).
    struct Step {
        var routing: RoutingTable
        var plan: RoutingPlan
        var participants: RankMask
        var epoch: Int
        var dispatched = false
    }

    init(rank: Int) { self.rank = rank }

    func set(_ routing: RoutingTable, _ plan: RoutingPlan, _ participants: RankMask, epoch: Int) {
        lock.withLock {
            state = Step(routing: routing, plan: plan, participants: participants, epoch: epoch)
            failure = nil
        }
    }

    func fail(_ error: EPError) {
        lock.withLock {
            state = nil
            failure = error.description
        }
    }

    /// Records that a dispatch of the current step completed on this rank.
    func markDispatched() { lock.withLock { state?.dispatched = true } }

    func current() throws(EPError) -> Step {
        lock.lock()
        let state = self.state, failure = self.failure
        lock.unlock()
        if let failure { throw .wrongOrder("the last update of this handle failed (\(failure)); update again before dispatch or combine") }
        guard let state else { throw .wrongOrder("dispatch and combine need a handle updated with this step's topkIdx first") }
        return state
    }

    /// The plan of the last successful update, if any.
    public var plan: RoutingPlan? { lock.withLock { state?.plan } }
}
