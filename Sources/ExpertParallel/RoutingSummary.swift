/// What one source rank tells the others in the handle update: how many of its selections go to
/// each expert and how many of its tokens go to each rank. A few KB; enough for every rank to
/// compute every slot (docs/architecture.md, "Handles and buffer slots").
public struct RoutingSummary: Sendable, Equatable {
    /// `[E]`: selections of this source per global expert.
    public var selectionsPerExpert: [Int]
    /// `[R]`: unique (token, destination rank) pairs of this source per destination.
    public var tokensPerRank: [Int]

    /// Counts the first `keptTokens[d]` of the source's tokens bound for each rank `d`
    /// (all of them when `keptTokens` is nil). Checks first `config` (`validated()`), `routing`
    /// against it (its K, its tokens, every id below `experts`) and `keptTokens` (one per rank).
    public init(routing: RoutingTable, config: GroupConfig, keptTokens: [Int]? = nil) throws(EPError) {
        let config = try config.validated()
        try routing.check(against: config, "routing")
        if let keptTokens { try RoutingPlan.checkCount(keptTokens.count, "keptTokens.count", config.ranks, "ranks") }
        self.init(routing: routing, checked: config, keptTokens: keptTokens)
    }

    /// `init(routing:config:keptTokens:)` unchecked: `config` validated, `routing` made for it,
    /// `keptTokens` one per rank.
    init(routing: RoutingTable, checked config: GroupConfig, keptTokens: [Int]? = nil) {
        let localExperts = config.localExperts
        selectionsPerExpert = Array(repeating: 0, count: config.experts)
        tokensPerRank = Array(repeating: 0, count: config.ranks)
        for t in 0..<routing.tokens {
            for d in RoutingSummary.destinations(of: t, routing, localExperts) {
                if let keptTokens, tokensPerRank[d] >= keptTokens[d] { continue }
                tokensPerRank[d] += 1
                for k in 0..<routing.topK where routing.expert(t, k) >= 0 && routing.expert(t, k) / localExperts == d {
                    selectionsPerExpert[routing.expert(t, k)] += 1
                }
            }
        }
    }

    /// Nothing selected, nothing sent (a masked rank's summary).
    static func empty(_ config: GroupConfig) -> RoutingSummary { RoutingSummary(config) }

    private init(_ config: GroupConfig) {
        selectionsPerExpert = Array(repeating: 0, count: config.experts)
        tokensPerRank = Array(repeating: 0, count: config.ranks)
    }

    /// Destination ranks of token `t`, ascending, each once.
    static func destinations(of t: Int, _ routing: RoutingTable, _ localExperts: Int) -> [Int] {
        var ranks: [Int] = []
        for k in 0..<routing.topK where routing.expert(t, k) >= 0 {
            let d = routing.expert(t, k) / localExperts
            if !ranks.contains(d) { ranks.append(d) }
        }
        return ranks.sorted()
    }
}

/// Rows of the receive buffer that `summaries` occupy on rank `destination`
/// (HT: pairs for flat, padded expert zones for expert-major).
func occupiedRows(on destination: Int, _ summaries: [RoutingSummary?], _ config: GroupConfig) -> Int {
    let alive = summaries.compactMap { $0 }
    if !config.isExpertMajorHT { return alive.reduce(0) { $0 + $1.tokensPerRank[destination] } }
    let l = config.localExperts
    return (0..<l).reduce(0) { total, local in
        let count = alive.reduce(0) { $0 + $1.selectionsPerExpert[destination * l + local] }
        return total + roundUp(count, config.alignment)
    }
}

@inline(__always) func roundUp(_ value: Int, _ multiple: Int) -> Int { (value + multiple - 1) / multiple * multiple }
