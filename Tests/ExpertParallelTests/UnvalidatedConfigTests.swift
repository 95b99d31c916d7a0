import ExpertParallel
import Testing

/// A `GroupConfig` is a plain struct: every public function that takes one checks it first
/// (`validated()`) and throws its `invalidConfig`, and the sizes derived from one never trap
/// (ranks 0 divided E by 0; products of huge fields left Int).
@Suite("Unvalidated configurations")
struct UnvalidatedConfigTests {
    static func ll(ranks: Int = 2, experts: Int = 4, topK: Int = 2, hidden: Int = 8, maxTokens: Int = 4, layout: Layout? = nil) -> GroupConfig {
        GroupConfig(algorithm: .lowLatency, ranks: ranks, experts: experts, topK: topK, hidden: hidden, elementType: .f32,
                    maxTokensPerRank: maxTokens, layout: layout)
    }

    static let zeroRanks = EPError.invalidConfig(field: "ranks", value: "0", requirement: "must be in 1...64")

    @Test("the derived sizes of any configuration are numbers, not traps")
    func derivedSizesNeverTrap() {
        let zero = Self.ll(ranks: 0)
        #expect(zero.localExperts == 0)
        #expect(zero.receiveCapacity == 0 && zero.receiveShape == [0, 0, 8])
        #expect(Self.ll(ranks: -1, experts: .min).localExperts == 0, "Int.min / -1 would overflow")
        #expect(Self.ll(ranks: 1, experts: .min).receiveCapacity == .min)
        let huge = Self.ll(ranks: 64, experts: .max, hidden: .max, maxTokens: .max)
        #expect(huge.rowBytes == .max && huge.receiveCapacity == .max)
        #expect(huge.receiveShape == [Int.max / 64, .max, .max])
        let flat = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 8, maxTokensPerRank: .min)
        #expect(flat.receiveCapacity == .min && flat.receiveRoutingShape == [.min, 2])
        for alignment in [Int.min, -1, 0, Int.max] {
            let ht = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 8, maxTokensPerRank: .max,
                                 layout: .expertMajorPadded(alignment: alignment))
            #expect(ht.receiveShape.count == 2, "alignment \(alignment)")
        }
        // Within the bounds, exactly as before: R·B·min(K, L) + L·(a − 1).
        let padded = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 8, maxTokensPerRank: 4,
                                 layout: .expertMajorPadded(alignment: 4))
        #expect(padded.receiveCapacity == 2 * 4 * 2 + 2 * 3)
    }

    @Test("CallShapes and the call checks refuse a bad configuration by its own named error")
    func callChecksValidateTheConfig() throws {
        #expect(throws: Self.zeroRanks) { try CallShapes(Self.ll(ranks: 0)) }
        #expect(throws: EPError.invalidConfig(field: "topK", value: "0", requirement: "must be ≥ 1")) { try CallShapes(Self.ll(topK: 0)) }
        let rows = try HostTensor(.f32, [1, 8])
        #expect(throws: Self.zeroRanks) {
            try Self.ll(ranks: 0).validateDispatch(DispatchInput(tokens: rows.ref), DispatchOutput(tokens: rows.ref), tokens: 1)
        }
        #expect(throws: EPError.invalidConfig(field: "hidden", value: "\(Int.max)", requirement: "must be ≤ 2147483647")) {
            try Self.ll(hidden: .max).validateCombine(CombineInput(expertOutputs: rows.ref), CombineOutput(tokens: rows.ref), tokens: 1, direction: .forward)
        }
        #expect(try CallShapes(Self.ll()).receiveShape == [2, 8, 8])
    }

    @Test("a routing table checks its configuration before any arithmetic with it")
    func routingTableValidatesTheConfig() throws {
        #expect(throws: Self.zeroRanks) { try RoutingTable(experts: [], tokens: 0, config: Self.ll(ranks: 0)) }
        // tokens × topK would overflow.
        #expect(throws: EPError.invalidConfig(field: "topK", value: "\(Int.max)", requirement: "must be ≤ experts (4)")) {
            try RoutingTable(experts: [0, 1], tokens: 2, config: Self.ll(topK: .max))
        }
        let ids = try HostTensor(.i32, [1, 2])
        #expect(throws: Self.zeroRanks) { try RoutingTable(topkIdx: ids.ref, config: Self.ll(ranks: 0)) }
    }

    @Test("LayoutInfo.empty checks its configuration")
    func emptyLayoutValidatesTheConfig() throws {
        #expect(throws: Self.zeroRanks) { try LayoutInfo.empty(Self.ll(ranks: 0)) }
        #expect(throws: EPError.invalidConfig(field: "experts", value: "-4", requirement: "must be ≥ 1")) { try LayoutInfo.empty(Self.ll(experts: -4)) }
        #expect(try LayoutInfo.empty(Self.ll()).expertSourceCounters == [0, 0, 0, 0])
    }
}
