import ExpertParallel
import Testing

/// The public routing functions (`RoutingSummary`, `RoutingPlan`) check what they are given: a
/// bad configuration, a routing made for another one, a rank outside the group, summaries of the
/// wrong length or with impossible counts are named errors (they were an index out of range, a
/// division by zero or an overflow).
@Suite("Routing function checks")
struct RoutingCheckTests {
    static let config = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .f32,
                                    maxTokensPerRank: 3)
    /// Token 0 to experts 0 and 3 (ranks 0 and 1), token 1 to expert 1 and none.
    static func routing(_ config: GroupConfig = config) throws -> RoutingTable {
        try RoutingTable(experts: [0, 3, 1, -1], tokens: 2, config: config)
    }

    static func argument(_ field: String, _ value: Any, _ requirement: String) -> EPError {
        .invalidArgument(field: field, value: "\(value)", requirement: requirement)
    }

    @Test("a summary checks its configuration, its routing against it and its kept counts")
    func summaryChecks() throws {
        var zero = Self.config
        zero.ranks = 0
        #expect(throws: EPError.invalidConfig(field: "ranks", value: "0", requirement: "must be in 1...64")) {
            try RoutingSummary(routing: Self.routing(), config: zero)
        }
        // Made for 8 experts, summed for 4: expert 7 has no counter.
        var wide = Self.config
        wide.experts = 8
        let other = try RoutingTable(experts: [7, 0], tokens: 1, config: wide)
        #expect(throws: Self.argument("routing[0][0]", 7, "must be -1 or in [0, 4)")) { try RoutingSummary(routing: other, config: Self.config) }
        var k3 = Self.config
        k3.topK = 3
        #expect(throws: Self.argument("routing.topK", 2, "must be topK (3)")) { try RoutingSummary(routing: Self.routing(), config: k3) }
        #expect(throws: Self.argument("keptTokens.count", 1, "must be ranks (2)")) {
            try RoutingSummary(routing: Self.routing(), config: Self.config, keptTokens: [1])
        }
        let summary = try RoutingSummary(routing: Self.routing(), config: Self.config)
        #expect(summary.selectionsPerExpert == [1, 1, 0, 1] && summary.tokensPerRank == [2, 1])
    }

    @Test("a plan checks its rank, its summaries and its kept counts")
    func planChecks() throws {
        let routing = try Self.routing()
        let summary = try RoutingSummary(routing: routing, config: Self.config)
        let both: [RoutingSummary?] = [summary, summary]
        for rank in [-1, 2, Int.max, Int.min] {
            #expect(throws: Self.argument("rank", rank, "must be in 0..<2")) {
                try RoutingPlan.keptTokens(config: Self.config, rank: rank, routing: routing, summaries: both)
            }
            #expect(throws: Self.argument("rank", rank, "must be in 0..<2")) {
                try RoutingPlan(config: Self.config, rank: rank, routing: routing, keptTokens: [2, 1], kept: both, full: both)
            }
        }
        #expect(throws: Self.argument("summaries.count", 1, "must be ranks (2)")) {
            try RoutingPlan.keptTokens(config: Self.config, rank: 1, routing: routing, summaries: [summary])
        }
        #expect(throws: Self.argument("full.count", 0, "must be ranks (2)")) {
            try RoutingPlan(config: Self.config, rank: 0, routing: routing, keptTokens: [2, 1], kept: both, full: [])
        }
        #expect(throws: Self.argument("keptTokens.count", 3, "must be ranks (2)")) {
            try RoutingPlan(config: Self.config, rank: 0, routing: routing, keptTokens: [2, 1, 0], kept: both, full: both)
        }
        var short = summary
        short.tokensPerRank = [1]
        #expect(throws: Self.argument("kept[1].tokensPerRank.count", 1, "must be ranks (2)")) {
            try RoutingPlan(config: Self.config, rank: 0, routing: routing, keptTokens: [2, 1], kept: [summary, short], full: both)
        }
        var huge = summary
        huge.tokensPerRank = [Int.max, 0]
        #expect(throws: Self.argument("summaries[0].tokensPerRank[0]", Int.max, "must be in 0...maxTokensPerRank (3)")) {
            try RoutingPlan.keptTokens(config: Self.config, rank: 1, routing: routing, summaries: [huge, summary])
        }
        // Each count below the bound, their sum past it (and past Int).
        var many = summary
        many.selectionsPerExpert = [6, Int.max, 0, 0]
        #expect(throws: Self.argument("full[0].selectionsPerExpert[1]", Int.max,
                                      "must be ≥ 0, with a source's selections at most maxTokensPerRank × topK (6) in all (6 before it)")) {
            try RoutingPlan(config: Self.config, rank: 1, routing: routing, keptTokens: [2, 1], kept: both, full: [many, nil])
        }
        var negative = summary
        negative.selectionsPerExpert = [-1, 0, 0, 0]
        #expect(throws: Self.argument("summaries[1].selectionsPerExpert[0]", -1,
                                      "must be ≥ 0, with a source's selections at most maxTokensPerRank × topK (6) in all (0 before it)")) {
            try RoutingPlan.keptTokens(config: Self.config, rank: 0, routing: routing, summaries: [nil, negative])
        }
        // Checked inputs plan as before.
        #expect(try RoutingPlan.keptTokens(config: Self.config, rank: 0, routing: routing, summaries: both) == [2, 1])
        let plan = try RoutingPlan(config: Self.config, rank: 1, routing: routing, keptTokens: [2, 1], kept: both, full: both)
        #expect(plan.pairRow == [2, 1, 3, -1] && plan.received.sourceRankCounters == [1, 1])
    }
}
