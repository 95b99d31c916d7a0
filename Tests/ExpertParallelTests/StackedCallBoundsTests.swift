import ExpertParallel
import Testing

/// The stacked calls' public pieces with extreme values: a stride asked with alignment or ranks
/// below 1, a dispatch of parts below 1, a combine of negative or huge token counts, and an
/// address of a rank outside the parts are named errors or wrapped addresses, not traps.
@Suite("Stacked call bounds")
struct StackedCallBoundsTests {
    static let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .f32, maxTokensPerRank: 4)

    static func tensor(_ address: UInt64) -> StackedTensor { StackedTensor(address: address, dtype: .f32, location: .host) }

    /// One token a rank: inputs [1, 8] and received [2, 8, 8] f32, packed.
    static let dispatch = StackedDispatch(tokens: 1, topkIdx: nil, inputs: tensor(1 << 20), received: tensor(1 << 24))
    static let combine = StackedCombine(expertOutputs: tensor(1 << 24), topkWeights: tensor(1 << 28), combined: tensor(1 << 20))

    @Test("a stride with alignment or ranks below 1, or negative elements, is refused by name")
    func strideArguments() throws {
        let part = Self.tensor(1 << 20)
        #expect(throws: EPError.invalidArgument(field: "alignment", value: "0", requirement: "must be ≥ 1")) {
            try part.stride("inputs", elements: 8, shape: [1, 8], alignment: 0, ranks: 2)
        }
        #expect(throws: EPError.invalidArgument(field: "alignment", value: "\(Int.min)", requirement: "must be ≥ 1")) {
            try part.stride("inputs", elements: 8, shape: [1, 8], alignment: .min, ranks: 2)
        }
        #expect(throws: EPError.invalidArgument(field: "ranks", value: "-1", requirement: "must be ≥ 1")) {
            try part.stride("inputs", elements: 8, shape: [1, 8], alignment: 8, ranks: -1)
        }
        #expect(throws: EPError.invalidArgument(field: "elements", value: "-8", requirement: "must be ≥ 0")) {
            try part.stride("inputs", elements: -8, shape: [-1, 8], alignment: 8, ranks: 2)
        }
        #expect(try part.stride("inputs", elements: 8, shape: [1, 8], alignment: 8, ranks: 2) == 32)
    }

    @Test("a stacked dispatch of parts outside 1...ranks is refused by name")
    func dispatchParts() throws {
        let shapes = try CallShapes(Self.config)
        for parts in [-1, 0, 3, Int.min] {
            #expect(throws: EPError.invalidArgument(field: "parts", value: "\(parts)", requirement: "must be in 1...ranks (2)")) {
                try CheckedStackedDispatch(Self.dispatch, shapes: shapes, location: .host, stepTokens: nil, parts: parts)
            }
        }
        _ = try CheckedStackedDispatch(Self.dispatch, shapes: shapes, location: .host, stepTokens: nil, parts: 1)
    }

    @Test("a stacked combine's token counts must be one per part, each in 0...maxTokensPerRank")
    func combineTokens() throws {
        let shapes = try CallShapes(Self.config)
        for (tokens, field, value, requirement) in [
            ([-5], "tokens[0]", "-5", "must be in 0...maxTokensPerRank (4)"),
            ([1, Int.max], "tokens[1]", "\(Int.max)", "must be in 0...maxTokensPerRank (4)"),
            ([1, Int.min], "tokens[1]", "\(Int.min)", "must be in 0...maxTokensPerRank (4)"),
            ([], "tokens.count", "0", "must be in 1...ranks (2): one entry per part"),
            ([1, 1, 1], "tokens.count", "3", "must be in 1...ranks (2): one entry per part"),
        ] {
            #expect(throws: EPError.invalidArgument(field: field, value: value, requirement: requirement)) {
                try CheckedStackedCombine(Self.combine, tokens: tokens, direction: .forward, shapes: shapes, location: .host)
            }
        }
        _ = try CheckedStackedCombine(Self.combine, tokens: [1, 0], direction: .forward, shapes: shapes, location: .host)
    }

    @Test("an address or views of a rank outside the parts wrap instead of trapping")
    func ranksOutsideTheParts() throws {
        let shapes = try CallShapes(Self.config)
        let dispatch = try CheckedStackedDispatch(Self.dispatch, shapes: shapes, location: .host, stepTokens: nil)
        #expect(dispatch.address(.inputs, rank: 1) == (1 << 20) + 32)
        #expect(dispatch.address(.received, rank: 1) == (1 << 24) + 512)
        #expect(dispatch.address(.inputs, rank: -1) == (1 << 20) - 32)
        for rank in [Int.max, Int.min, -1, 2] {
            _ = dispatch.address(.received, rank: rank)
            _ = dispatch.rank(rank)
        }
        let combine = try CheckedStackedCombine(Self.combine, tokens: [1, 1], direction: .forward, shapes: shapes, location: .host)
        #expect(combine.rank(1).output.tokens.shape == [1, 8])
        for rank in [Int.max, Int.min, -1, 2] {
            #expect(combine.rank(rank).output.tokens.shape == [0, 8], "rank \(rank): no rows")
            _ = combine.address(.combined, rank: rank)
        }
    }
}
