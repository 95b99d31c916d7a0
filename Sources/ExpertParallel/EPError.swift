/// Every error the library reports. Each case names what was wrong, the value, and the bound.
public enum EPError: Error, Sendable, Equatable, CustomStringConvertible {
    /// A configuration field is out of bounds.
    case invalidConfig(field: String, value: String, requirement: String)
    /// A call argument (tensor, shape, routing entry) is out of bounds.
    case invalidArgument(field: String, value: String, requirement: String)
    /// One token's routing row names the same expert twice.
    case repeatedExpert(token: Int, firstColumn: Int, secondColumn: Int, expert: Int)
    /// More rows would reach `rank` than its receive buffer holds (overflow policy `.fail`).
    case overflow(rank: Int, required: Int, capacity: Int)
    /// A call came out of order, such as dispatch before the handle's first update.
    case wrongOrder(String)
    /// `rank` waited longer than the timeout for `missing`; those ranks are now masked inactive.
    case timeout(rank: Int, missing: [Int])
    /// Another rank of the same step rejected its call, so this rank did nothing either.
    case peerFailed(rank: Int, peer: Int, reason: String)
    /// The calling rank is masked inactive; clean it first.
    case inactiveRank(Int)
    /// A failure below the library: a driver, compiler or transport call.
    case backend(String)

    public var description: String {
        switch self {
        case let .invalidConfig(field, value, requirement):
            "invalid configuration: \(field) = \(value); \(requirement)"
        case let .invalidArgument(field, value, requirement):
            "invalid argument: \(field) = \(value); \(requirement)"
        case let .repeatedExpert(token, first, second, expert):
            "invalid argument: topkIdx token \(token) names expert \(expert) twice (columns \(first) and \(second)); each expert may appear once per token"
        case let .overflow(rank, required, capacity):
            "overflow: rank \(rank) would receive \(required) rows but maxReceivedTokensPerRank is \(capacity)"
        case let .wrongOrder(message):
            "call out of order: \(message)"
        case let .timeout(rank, missing):
            "timeout: rank \(rank) waited past the timeout for rank(s) \(missing), now masked inactive"
        case let .peerFailed(rank, peer, reason):
            "rank \(rank) did nothing because rank \(peer) rejected its call: \(reason)"
        case let .inactiveRank(rank):
            "rank \(rank) is masked inactive; clean it before calling"
        case let .backend(message):
            message
        }
    }
}
