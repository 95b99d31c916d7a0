import ExpertParallel
import Testing

/// Every configuration bound, rejected with `invalidConfig` naming the field, its value and the
/// bound.
@Suite("Configuration validation")
struct ConfigValidationTests {
    struct Case: Sendable, CustomTestStringConvertible {
        var name: String
        var config: GroupConfig
        var field: String
        var value: String
        /// A fragment the requirement must contain (the bound).
        var bound: String
        var testDescription: String { name }
    }

    static func ll(ranks: Int = 2, experts: Int = 4, topK: Int = 2, hidden: Int = 8, type: DataType = .bf16,
                   maxTokens: Int = 4, received: Int? = nil, layout: Layout? = nil) -> GroupConfig {
        GroupConfig(algorithm: .lowLatency, ranks: ranks, experts: experts, topK: topK, hidden: hidden, elementType: type,
                    maxTokensPerRank: maxTokens, maxReceivedTokensPerRank: received, layout: layout)
    }

    static func ht(layout: Layout = .flat, received: Int? = nil, timeout: Duration = .seconds(1)) -> GroupConfig {
        GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 8, maxTokensPerRank: 4,
                    maxReceivedTokensPerRank: received, layout: layout, timeout: timeout)
    }

    static let cases: [Case] = [
        Case(name: "zero ranks", config: ll(ranks: 0), field: "ranks", value: "0", bound: "1...64"),
        Case(name: "negative ranks", config: ll(ranks: -2), field: "ranks", value: "-2", bound: "1...64"),
        Case(name: "more than 64 ranks", config: ll(ranks: 65, experts: 65), field: "ranks", value: "65", bound: "1...64"),
        Case(name: "zero experts", config: ll(experts: 0), field: "experts", value: "0", bound: "≥ 1"),
        Case(name: "negative experts", config: ll(experts: -4), field: "experts", value: "-4", bound: "≥ 1"),
        Case(name: "experts not a multiple of ranks", config: ll(ranks: 4, experts: 10), field: "experts", value: "10", bound: "multiple of ranks (4)"),
        Case(name: "zero topK", config: ll(topK: 0), field: "topK", value: "0", bound: "≥ 1"),
        Case(name: "negative topK", config: ll(topK: -1), field: "topK", value: "-1", bound: "≥ 1"),
        Case(name: "topK above experts", config: ll(experts: 4, topK: 5), field: "topK", value: "5", bound: "≤ experts (4)"),
        Case(name: "topK above 32", config: ll(experts: 64, topK: 33), field: "topK", value: "33", bound: "≤ 32"),
        Case(name: "zero hidden", config: ll(hidden: 0), field: "hidden", value: "0", bound: "≥ 1"),
        Case(name: "negative hidden", config: ll(hidden: -8), field: "hidden", value: "-8", bound: "≥ 1"),
        Case(name: "bf16 row of 6 bytes", config: ll(hidden: 3), field: "hidden", value: "3", bound: "multiple of 8 bytes"),
        Case(name: "f32 row of 12 bytes", config: ll(hidden: 3, type: .f32), field: "hidden", value: "3", bound: "(= 12)"),
        Case(name: "u8 row of 4 bytes", config: ll(hidden: 4, type: .u8), field: "hidden", value: "4", bound: "multiple of 8 bytes"),
        Case(name: "index type as payload", config: ll(type: .i32), field: "elementType", value: "i32", bound: "bf16, f16, f32 or u8"),
        Case(name: "zero maxTokensPerRank", config: ll(maxTokens: 0), field: "maxTokensPerRank", value: "0", bound: "≥ 1"),
        Case(name: "negative maxTokensPerRank", config: ll(maxTokens: -3), field: "maxTokensPerRank", value: "-3", bound: "≥ 1"),
        Case(name: "LL with maxReceivedTokensPerRank", config: ll(received: 16), field: "maxReceivedTokensPerRank", value: "16", bound: "must be nil for LL"),
        Case(name: "LL rank-major with maxReceivedTokensPerRank", config: ll(received: 8, layout: .rankMajor), field: "maxReceivedTokensPerRank", value: "8", bound: "must be nil for LL"),
        Case(name: "HT flat layout with the LL algorithm", config: ll(layout: .flat), field: "layout", value: "flat", bound: "LL takes expertMajor or rankMajor"),
        Case(name: "HT expert-major layout with the LL algorithm", config: ll(layout: .expertMajorPadded(alignment: 4)), field: "layout", value: "expert-major(alignment 4)", bound: "algorithm ll"),
        Case(name: "LL layout with the HT algorithm", config: ht(layout: .rankMajor), field: "layout", value: "rank-major", bound: "HT takes flat or expertMajorPadded"),
        Case(name: "alignment 0", config: ht(layout: .expertMajorPadded(alignment: 0)), field: "layout.alignment", value: "0", bound: "1...1024"),
        Case(name: "negative alignment", config: ht(layout: .expertMajorPadded(alignment: -2)), field: "layout.alignment", value: "-2", bound: "1...1024"),
        Case(name: "alignment above 1024", config: ht(layout: .expertMajorPadded(alignment: 1025)), field: "layout.alignment", value: "1025", bound: "1...1024"),
        Case(name: "HT zero receive capacity", config: ht(received: 0), field: "maxReceivedTokensPerRank", value: "0", bound: "≥ 1"),
        Case(name: "zero timeout", config: ht(timeout: .zero), field: "timeout", value: "0.0 seconds", bound: "≥ 1 nanosecond"),
        Case(name: "sub-nanosecond timeout", config: ht(timeout: .seconds(1e-12)), field: "timeout", value: "1e-12 seconds", bound: "≥ 1 nanosecond"),
        // Sizes whose products would leave Int (a trap in the shapes' arithmetic before the check).
        Case(name: "hidden above 2^31 - 1", config: ll(hidden: Int.max / 2), field: "hidden", value: "\(Int.max / 2)", bound: "≤ 2147483647"),
        Case(name: "maxTokensPerRank above 2^31 - 1", config: ll(maxTokens: 1 << 62), field: "maxTokensPerRank", value: "\(1 << 62)", bound: "≤ 2147483647"),
        Case(name: "experts above 2^31 - 1", config: ll(experts: 1 << 40), field: "experts", value: "\(1 << 40)", bound: "≤ 2147483647"),
        Case(name: "HT receive capacity above 2^40", config: ht(received: (1 << 40) + 1), field: "maxReceivedTokensPerRank", value: "\((1 << 40) + 1)", bound: "≤ 1099511627776"),
        Case(name: "timeout above a day", config: ht(timeout: .seconds(86_401)), field: "timeout", value: "86401.0 seconds", bound: "≤ 86400 seconds"),
    ]

    @Test("an out-of-bounds configuration is rejected, naming the field, the value and the bound", arguments: cases)
    func rejectsConfiguration(_ c: Case) {
        let error = #expect(throws: EPError.self) { try c.config.validated() }
        guard case let .invalidConfig(field, value, requirement)? = error else {
            Issue.record("expected invalidConfig, got \(String(describing: error))")
            return
        }
        #expect(field == c.field)
        #expect(value == c.value)
        #expect(requirement.contains(c.bound), "requirement: \(requirement)")
        let message = error!.description
        #expect(message.contains(c.field) && message.contains(c.value) && message.contains(c.bound), "message: \(message)")
    }

    @Test("a host group refuses an invalid configuration with the same error", arguments: cases)
    func hostGroupRejectsConfiguration(_ c: Case) {
        guard let expected = #expect(throws: EPError.self, performing: { try c.config.validated() }) else { return }
        #expect(throws: expected) { _ = try HostGroup(c.config) }
    }

    @Test("boundary values are accepted", arguments: [
        ll(ranks: 1, experts: 1, topK: 1, hidden: 4),
        ll(ranks: 64, experts: 64, topK: 32, hidden: 2, type: .f32),
        ll(hidden: 8, type: .u8),
        ht(layout: .expertMajorPadded(alignment: 1)),
        ht(layout: .expertMajorPadded(alignment: 1024), received: 1),
    ])
    func acceptsBoundaryConfiguration(_ config: GroupConfig) throws {
        #expect(try config.validated() == config)
    }

    @Test("the default layout is expert-major for LL and flat for HT, and capacities follow the documented shapes")
    func defaultLayoutsAndCapacities() {
        let llc = Self.ll(ranks: 2, experts: 6, maxTokens: 5)
        #expect(llc.layout == .expertMajor && llc.receiveShape == [3, 10, 8] && llc.receiveRoutingShape == nil)
        var rm = llc
        rm.layout = .rankMajor
        #expect(rm.receiveShape == [2, 5, 8] && rm.receiveRoutingShape == [2, 5, 2])
        let flat = Self.ht()
        #expect(flat.layout == .flat && flat.receiveCapacity == 8 && flat.receiveShape == [8, 8] && flat.receiveRoutingShape == [8, 2])
        // Expert-major default N: every selection (R·Bmax·min(K, L)) plus a full padding per zone (L·(A − 1)).
        let em = Self.ht(layout: .expertMajorPadded(alignment: 4))
        #expect(em.receiveCapacity == 2 * 4 * 2 + 2 * 3 && em.receiveRoutingShape == [em.receiveCapacity])
        #expect(Self.ht(received: 5).receiveCapacity == 5)
    }
}
