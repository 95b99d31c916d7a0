import Foundation

/// One rank's per-step state on the host backend: the routing of the last successful update and
/// the plan derived from it. A failed update leaves the previous state in place.
public final class HostHandle: @unchecked Sendable {
    public let rank: Int
    private let lock = NSLock()
    private var state: (routing: RoutingTable, plan: RoutingPlan, participants: RankMask)?

    init(rank: Int) { self.rank = rank }

    func set(_ routing: RoutingTable, _ plan: RoutingPlan, _ participants: RankMask) {
        lock.withLock { state = (routing, plan, participants) }
    }

    func current() throws(EPError) -> (routing: RoutingTable, plan: RoutingPlan, participants: RankMask) {
        guard let state = lock.withLock({ state }) else {
            throw .wrongOrder("dispatch and combine need a handle updated with this step's topkIdx first")
        }
        return state
    }

    /// The plan of the last successful update, if any.
    public var plan: RoutingPlan? { lock.withLock { state?.plan } }
}
