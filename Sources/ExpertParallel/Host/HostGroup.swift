import Foundation

/// R ranks in one process on the CPU: the oracle every GPU result is checked against, and the
/// default backend where no GPU is present. `group[r]` is rank r's view; each rank's calls may
/// run on a thread of their own and meet the others only through the group's transport.
public final class HostGroup: Sendable {
    public let config: GroupConfig
    /// The call checks' shapes, worked out once for every rank's calls.
    public let shapes: CallShapes
    let transport: HostTransport
    let counters: [RoundCounter]
    /// Per rank: whether one of its calls is under way (a rank makes its calls one at a time).
    let calling: [CallFlag]

    /// Refuses, with `outOfMemory`, a configuration whose per-step routing metadata (which grows
    /// with `experts` and `ranks`) cannot fit in this host's memory, before anything is allocated.
    public init(_ config: GroupConfig) throws(EPError) {
        self.config = try config.validated()
        try config.checkHostStepMemory(tokens: 0)
        shapes = CallShapes(validated: self.config)
        transport = HostTransport(ranks: config.ranks)
        counters = (0..<config.ranks).map { _ in RoundCounter() }
        calling = (0..<config.ranks).map { _ in CallFlag() }
    }

    /// Rank `rank`'s view (as `rank(_:)`): `invalidArgument` naming `rank` where it is not in
    /// `0..<config.ranks`.
    public subscript(rank: Int) -> HostRank {
        get throws(EPError) { try self.rank(rank) }
    }

    /// Rank `rank`'s view, or `invalidArgument` naming `rank` where it is not in `0..<config.ranks`.
    public func rank(_ rank: Int) throws(EPError) -> HostRank {
        guard rank >= 0 && rank < config.ranks else {
            throw .invalidArgument(field: "rank", value: "\(rank)", requirement: "must be in 0..<\(config.ranks)")
        }
        return HostRank(group: self, rank: rank)
    }

    public var ranks: [HostRank] { (0..<config.ranks).map { HostRank(group: self, rank: $0) } }

    /// Runs `body` for every rank (or each of `chosen`) at once, one thread per rank (ranks wait
    /// for each other, so they must run concurrently), and returns the results in that order.
    /// A rank of `chosen` outside the group, or one named twice, fails every entry with
    /// `invalidArgument` and runs nothing.
    public func run<T: Sendable>(
        ranks chosen: [Int]? = nil, _ body: @escaping @Sendable (HostRank) throws(EPError) -> T
    ) -> [Result<T, EPError>] {
        let which = chosen ?? Array(0..<config.ranks)
        if let error = Self.refusal(of: which, ranks: config.ranks) {
            return which.map { _ in .failure(error) }
        }
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

extension HostGroup {
    /// Why `run(ranks:)` cannot run `which` in a group of `ranks` ranks, or nil.
    static func refusal(of which: [Int], ranks: Int) -> EPError? {
        var seen = Set<Int>()
        for (i, r) in which.enumerated() {
            guard r >= 0 && r < ranks else {
                return .invalidArgument(field: "ranks[\(i)]", value: "\(r)", requirement: "must be in 0..<\(ranks)")
            }
            guard seen.insert(r).inserted else {
                return .invalidArgument(field: "ranks[\(i)]", value: "\(r)", requirement: "must be named once (each rank runs on one thread)")
            }
        }
        return nil
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

    /// Rounds taken in epoch `current` (0 in a new one).
    func position(epoch current: Int) -> Int { lock.withLock { current == epoch ? round : 0 } }
}

/// Whether a rank has a call under way.
final class CallFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var busy = false

    /// True and marks the call under way, or false when one already is.
    func enter() -> Bool { lock.withLock { if busy { return false }; busy = true; return true } }
    func leave() { lock.withLock { busy = false } }
}

final class ResultBox<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var slots: [Result<T, EPError>?]
    init(count: Int) { slots = Array(repeating: nil, count: count) }
    func set(_ index: Int, _ value: Result<T, EPError>) { lock.withLock { slots[index] = value } }
    var values: [Result<T, EPError>] { lock.withLock { slots.map { $0! } } }
}

extension GroupConfig {
    /// Bytes of host memory the host backend's routing metadata of one step takes, for all R
    /// ranks with `tokens` tokens each (an upper bound): per rank, its routing summaries (full,
    /// kept, and the one of masked ranks), the expert zones and the layout info it receives, about
    /// 6 × (E + R) words; and per token 3K + R words of routing and slots. Saturates at Int.max.
    package func hostStepBytes(tokens: Int) -> Int {
        func mul(_ a: Int, _ b: Int) -> Int {
            let (p, o) = a.multipliedReportingOverflow(by: b)
            return o ? .max : p
        }
        func add(_ a: Int, _ b: Int) -> Int {
            let (s, o) = a.addingReportingOverflow(b)
            return o ? .max : s
        }
        let perRankWords = add(mul(6, add(max(experts, 0), max(ranks, 0))), mul(max(tokens, 0), add(mul(3, max(topK, 0)), max(ranks, 0))))
        return mul(mul(perRankWords, 8), max(ranks, 1))
    }

    /// Throws `outOfMemory` when one step's host routing metadata for `tokens` tokens per rank
    /// (`hostStepBytes`) is more than this host's memory: checked before it is allocated.
    package func checkHostStepMemory(tokens: Int) throws(EPError) {
        let bytes = hostStepBytes(tokens: tokens)
        let available = Int(clamping: ProcessInfo.processInfo.physicalMemory)
        guard bytes <= available else {
            let what = tokens == 0
                ? "the host backend's routing metadata of one step (\(ranks) ranks × 6 × (experts \(experts) + ranks) × 8 bytes)"
                : "the host backend's routing metadata of one step with \(tokens) tokens per rank (\(ranks) ranks × (6 × (experts \(experts) + ranks) + \(tokens) × (3 × topK \(topK) + ranks)) × 8 bytes)"
            throw .outOfMemory(buffer: what, bytes: bytes, available: available)
        }
    }
}
