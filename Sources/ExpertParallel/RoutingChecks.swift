/// The checks of the public routing functions (`RoutingSummary.init`, `RoutingPlan.keptTokens`,
/// `RoutingPlan.init`, `LayoutInfo.empty`): a configuration `validated()` refuses, a routing made
/// for another configuration, or summaries and counts of the wrong length or size are named
/// errors, not an index out of range or an overflow. The host backend builds these from its own
/// validated configuration and calls the unchecked forms.
extension RoutingTable {
    /// Refuses a routing not made for `config` (validated): its K, its token count, every id below
    /// `experts` (an id ≥ -1 is the table's own invariant).
    func check(against config: GroupConfig, _ name: String) throws(EPError) {
        guard topK == config.topK else {
            throw .invalidArgument(field: "\(name).topK", value: "\(topK)", requirement: "must be topK (\(config.topK))")
        }
        guard tokens <= config.maxTokensPerRank else {
            throw .invalidArgument(field: "\(name).tokens", value: "\(tokens)", requirement: "must be in 0...maxTokensPerRank (\(config.maxTokensPerRank))")
        }
        for (i, e) in experts.enumerated() where Int(e) >= config.experts {
            throw .invalidArgument(field: "\(name)[\(i / topK)][\(i % topK)]", value: "\(e)", requirement: "must be -1 or in [0, \(config.experts))")
        }
    }
}

extension RoutingSummary {
    /// Refuses a summary that no source of `config` (validated) could send: arrays of E and R
    /// counts, a rank's tokens at most maxTokensPerRank, its selections at most
    /// maxTokensPerRank × topK in all (so that no sum of them leaves Int).
    func check(_ name: String, _ config: GroupConfig) throws(EPError) {
        try RoutingPlan.checkCount(selectionsPerExpert.count, "\(name).selectionsPerExpert.count", config.experts, "experts")
        try RoutingPlan.checkCount(tokensPerRank.count, "\(name).tokensPerRank.count", config.ranks, "ranks")
        for (d, n) in tokensPerRank.enumerated() where n < 0 || n > config.maxTokensPerRank {
            throw .invalidArgument(field: "\(name).tokensPerRank[\(d)]", value: "\(n)", requirement: "must be in 0...maxTokensPerRank (\(config.maxTokensPerRank))")
        }
        let most = config.maxTokensPerRank * config.topK
        var total = 0
        for (e, n) in selectionsPerExpert.enumerated() {
            guard n >= 0, n <= most - total else {
                throw .invalidArgument(
                    field: "\(name).selectionsPerExpert[\(e)]", value: "\(n)",
                    requirement: "must be ≥ 0, with a source's selections at most maxTokensPerRank × topK (\(most)) in all (\(total) before it)")
            }
            total += n
        }
    }
}

extension RoutingPlan {
    /// Refuses an array of `count` entries where the configuration has `expected` (its `what`).
    static func checkCount(_ count: Int, _ field: String, _ expected: Int, _ what: String) throws(EPError) {
        guard count == expected else {
            throw .invalidArgument(field: field, value: "\(count)", requirement: "must be \(what) (\(expected))")
        }
    }

    /// `rank` a rank of `config` (validated), `routing` made for it, and each array of summaries
    /// (named) one entry per rank, each given one possible.
    static func check(
        _ config: GroupConfig, rank: Int, routing: RoutingTable, summaries: [(name: String, summaries: [RoutingSummary?])]
    ) throws(EPError) {
        guard rank >= 0, rank < config.ranks else {
            throw .invalidArgument(field: "rank", value: "\(rank)", requirement: "must be in 0..<\(config.ranks)")
        }
        try routing.check(against: config, "routing")
        for (name, list) in summaries {
            try checkCount(list.count, "\(name).count", config.ranks, "ranks")
            for (r, summary) in list.enumerated() { try summary?.check("\(name)[\(r)]", config) }
        }
    }
}
