/// Counts and offsets of the rows a rank received in one step.
public struct LayoutInfo: Sendable, Equatable {
    /// `[L]`: rows per local expert (padding rows excluded).
    public var expertCounters: [Int]
    /// `[L]`: first row of each local expert's zone (expert-major layouts; zeros otherwise).
    public var expertOffsets: [Int]
    /// `[R]`: (token, this rank) pairs received from each source rank.
    public var sourceRankCounters: [Int]
    /// `[L, R]`: rows per (local expert, source rank).
    public var expertSourceCounters: [Int]
    /// Rows of the receive buffer in use (HT expert-major: padding included).
    public var receivedTotal: Int
    /// (token, this rank) pairs dropped by the `.drop` overflow policy.
    public var droppedTokens: Int

    public init(
        expertCounters: [Int], expertOffsets: [Int], sourceRankCounters: [Int], expertSourceCounters: [Int],
        receivedTotal: Int, droppedTokens: Int
    ) {
        self.expertCounters = expertCounters
        self.expertOffsets = expertOffsets
        self.sourceRankCounters = sourceRankCounters
        self.expertSourceCounters = expertSourceCounters
        self.receivedTotal = receivedTotal
        self.droppedTokens = droppedTokens
    }

    /// What a rank masked inactive received: nothing (every count zero) for `config`'s shape;
    /// `config` is checked first (`validated()`).
    public static func empty(_ config: GroupConfig) throws(EPError) -> LayoutInfo { empty(checked: try config.validated()) }

    /// `empty(_:)` for a validated configuration.
    package static func empty(checked config: GroupConfig) -> LayoutInfo {
        let l = config.localExperts, r = config.ranks
        return LayoutInfo(expertCounters: Array(repeating: 0, count: l), expertOffsets: Array(repeating: 0, count: l),
                          sourceRankCounters: Array(repeating: 0, count: r), expertSourceCounters: Array(repeating: 0, count: l * r),
                          receivedTotal: 0, droppedTokens: 0)
    }
}

/// Pure functions from routing to slots: where each of a rank's selections and (token, rank) pairs
/// land on their destinations, and what the rank itself receives. Every backend uses one plan, so
/// every backend agrees on every slot.
public struct RoutingPlan: Sendable, Equatable {
    public let rank: Int
    public let tokens: Int
    /// `[B, K]`: receive-buffer row of each selection on its destination (LL expert-major: row of
    /// the flattened `[L, R*Bmax]` buffer; HT expert-major: slot row), or -1 (no expert, masked,
    /// dropped, or a layout without per-selection rows).
    public var selectionRow: [Int]
    /// `[B, R]`: receive-buffer row of each (token, destination) pair (LL rank-major: row of the
    /// flattened `[R, Bmax]` buffer; HT: row in the destination's pair order), or -1.
    public var pairRow: [Int]
    /// What this rank receives.
    public var received: LayoutInfo

    /// How many of `rank`'s tokens bound for each destination fit (a prefix in token order). With
    /// the `.fail` policy this throws if any destination would overflow. Checks first `config`
    /// (`validated()`), `rank`, `routing` against it and `summaries` (one per rank, each one a
    /// source of `config` could send).
    public static func keptTokens(
        config: GroupConfig, rank: Int, routing: RoutingTable, summaries: [RoutingSummary?]
    ) throws(EPError) -> [Int] {
        let config = try config.validated()
        try check(config, rank: rank, routing: routing, summaries: [("summaries", summaries)])
        return try keptTokens(checked: config, rank: rank, routing: routing, summaries: summaries)
    }

    /// `keptTokens(config:rank:routing:summaries:)` unchecked: every argument as that one checks them.
    static func keptTokens(
        checked config: GroupConfig, rank: Int, routing: RoutingTable, summaries: [RoutingSummary?]
    ) throws(EPError) -> [Int] {
        guard let mine = summaries[rank] else { return Array(repeating: 0, count: config.ranks) }
        guard config.algorithm == .highThroughput else { return mine.tokensPerRank }
        let capacity = config.receiveCapacity
        if config.overflow == .fail {
            for d in 0..<config.ranks {
                let required = occupiedRows(on: d, summaries, config)
                if required > capacity { throw .overflow(rank: d, required: required, capacity: capacity) }
            }
            return mine.tokensPerRank
        }
        var kept = mine.tokensPerRank
        for d in 0..<config.ranks {
            let earlier = Array(summaries[0..<rank])
            if occupiedRows(on: d, earlier + [mine], config) <= capacity { continue }
            if occupiedRows(on: d, earlier, config) > capacity { kept[d] = 0; continue }
            // This rank holds the boundary: keep its tokens, in order, while the zones still fit.
            let l = config.localExperts
            let alive = earlier.compactMap { $0 }
            var pairs = alive.reduce(0) { $0 + $1.tokensPerRank[d] }
            var zoneCounts = (0..<l).map { local in alive.reduce(0) { $0 + $1.selectionsPerExpert[d * l + local] } }
            var taken = 0
            for t in 0..<routing.tokens where RoutingSummary.destinations(of: t, routing, l).contains(d) {
                var trial = zoneCounts
                for c in 0..<routing.topK where routing.expert(t, c) >= 0 && routing.expert(t, c) / l == d { trial[routing.expert(t, c) % l] += 1 }
                let rows = config.isExpertMajorHT ? trial.reduce(0) { $0 + roundUp($1, config.alignment) } : pairs + 1
                if rows > capacity { break }
                zoneCounts = trial
                pairs += 1
                taken += 1
            }
            kept[d] = taken
        }
        return kept
    }

    /// The plan of `rank` given every rank's kept summary (nil for inactive ranks) and its own
    /// routing (already masked) and kept-token prefix per destination. Checks first `config`
    /// (`validated()`), `rank`, `routing` against it, `keptTokens` (one per rank) and `kept` and
    /// `full` (one per rank, each one a source of `config` could send).
    public init(
        config: GroupConfig, rank: Int, routing: RoutingTable, keptTokens: [Int], kept: [RoutingSummary?],
        full: [RoutingSummary?]
    ) throws(EPError) {
        let config = try config.validated()
        try Self.check(config, rank: rank, routing: routing, summaries: [("kept", kept), ("full", full)])
        try Self.checkCount(keptTokens.count, "keptTokens.count", config.ranks, "ranks")
        self.init(checked: config, rank: rank, routing: routing, keptTokens: keptTokens, kept: kept, full: full)
    }

    /// `init(config:rank:routing:keptTokens:kept:full:)` unchecked: every argument as that one checks them.
    init(
        checked config: GroupConfig, rank: Int, routing: RoutingTable, keptTokens: [Int], kept: [RoutingSummary?],
        full: [RoutingSummary?]
    ) {
        let r = config.ranks, l = config.localExperts, k = config.topK
        let bmax = config.maxTokensPerRank
        self.rank = rank
        tokens = routing.tokens
        let empty = RoutingSummary.empty(config)   // one for every masked rank (shared storage)
        let alive = kept.map { $0 ?? empty }

        // Zone starts of every destination's expert zones (HT expert-major).
        func zoneOffsets(_ d: Int) -> [Int] {
            var offsets: [Int] = [], running = 0
            for local in 0..<l {
                offsets.append(running)
                let count = alive.reduce(0) { $0 + $1.selectionsPerExpert[d * l + local] }
                running += roundUp(count, config.alignment)
            }
            return offsets
        }
        let offsets = config.isExpertMajorHT ? (0..<r).map(zoneOffsets) : []

        // Source side.
        selectionRow = Array(repeating: -1, count: tokens * k)
        pairRow = Array(repeating: -1, count: tokens * r)
        var pairsBefore = Array(repeating: 0, count: r)       // rows of earlier sources per destination
        for s in 0..<rank {
            for d in 0..<r { pairsBefore[d] += alive[s].tokensPerRank[d] }
        }
        // Per expert this rank selects (at most B·K of them, not E): rows of earlier sources, and
        // this rank's own so far.
        var selectionsBefore: [Int: Int] = [:]
        for e in routing.experts where e >= 0 && selectionsBefore[Int(e)] == nil {
            selectionsBefore[Int(e)] = (0..<rank).reduce(0) { $0 + alive[$1].selectionsPerExpert[Int(e)] }
        }
        var pairPosition = Array(repeating: 0, count: r)
        var selectionPosition: [Int: Int] = [:]
        for t in 0..<tokens {
            for d in RoutingSummary.destinations(of: t, routing, l) {
                defer { pairPosition[d] += 1 }
                guard pairPosition[d] < keptTokens[d] else { continue }
                switch config.layout {
                case .rankMajor: pairRow[t * r + d] = rank * bmax + pairPosition[d]
                default: pairRow[t * r + d] = pairsBefore[d] + pairPosition[d]
                }
                for c in 0..<k where routing.expert(t, c) >= 0 && routing.expert(t, c) / l == d {
                    let e = routing.expert(t, c), local = e % l
                    let position = selectionsBefore[e, default: 0] + selectionPosition[e, default: 0]
                    selectionPosition[e, default: 0] += 1
                    switch config.layout {
                    case .expertMajor: selectionRow[t * k + c] = local * r * bmax + position
                    case .expertMajorPadded: selectionRow[t * k + c] = offsets[d][local] + position
                    default: break
                    }
                }
            }
        }

        // Destination side.
        let me = rank
        let expertSource = (0..<l * r).map { i in alive[i % r].selectionsPerExpert[me * l + i / r] }
        let expertCounters = (0..<l).map { local in (0..<r).reduce(0) { $0 + expertSource[local * r + $1] } }
        let sourceCounters = (0..<r).map { alive[$0].tokensPerRank[me] }
        let expertOffsets: [Int]
        let total: Int
        switch config.layout {
        case .expertMajor:
            expertOffsets = (0..<l).map { $0 * r * bmax }
            total = expertCounters.reduce(0, +)
        case .expertMajorPadded:
            expertOffsets = offsets[me]
            total = expertCounters.reduce(0) { $0 + roundUp($1, config.alignment) }
        case .rankMajor, .flat:
            expertOffsets = Array(repeating: 0, count: l)
            total = sourceCounters.reduce(0, +)
        }
        let offered = full.compactMap { $0 }.reduce(0) { $0 + $1.tokensPerRank[me] }
        received = LayoutInfo(
            expertCounters: expertCounters, expertOffsets: expertOffsets, sourceRankCounters: sourceCounters,
            expertSourceCounters: expertSource, receivedTotal: total, droppedTokens: offered - sourceCounters.reduce(0, +))
    }
}
