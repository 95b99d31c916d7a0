import Foundation

/// One rank's per-step state on the host backend: the routing of the last update and the plan
/// derived from it. A failed update clears it, as the GPU backends void a failed step: dispatch
/// and combine then fail until an update succeeds, instead of moving the previous step's rows.
public final class HostHandle: @unchecked Sendable {
    public let rank: Int
    private let lock = NSLock()
    private var state: (routing: RoutingTable, plan: RoutingPlan, participants: RankMask)?
    private var failure: String?

    init(rank: Int) { self.rank = rank }

    func set(_ routing: RoutingTable, _ plan: RoutingPlan, _ participants: RankMask) {
        lock.withLock {
            state = (routing, plan, participants)
            failure = nil
        }
    }

    func fail(_ error: EPError) {
        lock.withLock {
            state = nil
            failure = error.description
        }
    }

    func current() throws(EPError) -> (routing: RoutingTable, plan: RoutingPlan, participants: RankMask) {
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
