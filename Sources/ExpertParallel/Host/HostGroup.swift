import Foundation

/// R ranks in one process on the CPU: the oracle every GPU result is checked against, and the
/// default backend where no GPU is present. `group[r]` is rank r's view; each rank's calls may
/// run on a thread of their own and meet the others only through the group's transport.
public final class HostGroup: Sendable {
    public let config: GroupConfig
    let transport: HostTransport
    let counters: [RoundCounter]

    public init(_ config: GroupConfig) throws(EPError) {
        self.config = try config.validated()
        transport = HostTransport(ranks: config.ranks)
        counters = (0..<config.ranks).map { _ in RoundCounter() }
    }

    public subscript(rank: Int) -> HostRank {
        precondition(rank >= 0 && rank < config.ranks, "rank \(rank) is not in 0..<\(config.ranks)")
        return HostRank(group: self, rank: rank)
    }

    public var ranks: [HostRank] { (0..<config.ranks).map { self[$0] } }

    /// Runs `body` for every rank at once, one thread per rank (ranks wait for each other, so
    /// they must run concurrently), and returns the results in rank order.
    public func run<T: Sendable>(
        ranks chosen: [Int]? = nil, _ body: @escaping @Sendable (HostRank) throws(EPError) -> T
    ) -> [Result<T, EPError>] {
        let which = chosen ?? Array(0..<config.ranks)
        let results = ResultBox<T>(count: which.count)
        let done = DispatchGroup()
        for (slot, r) in which.enumerated() {
            done.enter()
            let thread = Thread { [self] in
                results.set(slot, Result { () throws(EPError) -> T in try body(self[r]) })
                done.leave()
            }
            thread.stackSize = 1 << 22
            thread.start()
        }
        done.wait()
        return results.values
    }
}

/// Per-rank round numbering of the transport's all-gathers.
final class RoundCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var epoch = 0
    private var round = 0

    func next(epoch current: Int) -> HostTransport.RoundKey {
        lock.withLock {
            if current != epoch { epoch = current; round = 0 }
            round += 1
            return .init(epoch: epoch, round: round)
        }
    }
}

final class ResultBox<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var slots: [Result<T, EPError>?]
    init(count: Int) { slots = Array(repeating: nil, count: count) }
    func set(_ index: Int, _ value: Result<T, EPError>) { lock.withLock { slots[index] = value } }
    var values: [Result<T, EPError>] { lock.withLock { slots.map { $0! } } }
}
