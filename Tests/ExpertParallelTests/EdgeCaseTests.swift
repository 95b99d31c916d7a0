import ExpertParallel
import Testing

/// Boundary shapes of a step, each checked end to end (rows, indices, weights, counters, combine,
/// weight gradients) against the reference.
@Suite("Edge cases")
struct EdgeCaseTests {
    /// Expert (s + t + k·(E/2 + 1)) mod E: distinct within a row for the K used here.
    static func spread(_ experts: Int) -> (Int, Int, Int) -> Int32 {
        { s, t, k in Int32((s + t + k * (experts / 2 + 1)) % experts) }
    }

    @Test("ranks with no tokens send nothing and still receive", arguments: LayoutKind.allCases)
    func someRanksWithoutTokens(kind: LayoutKind) throws {
        let scenario = Scenario.make(kind, ranks: 4, localExperts: 2, topK: 2, maxTokens: 5, tokenCounts: [0, 3, 0, 5], expert: Self.spread(8))
        try Verify.wholeStep(scenario, .forward)
        try Verify.wholeStep(scenario, .backward)
    }

    @Test("a step where no rank has tokens receives nothing and combines nothing", arguments: LayoutKind.allCases)
    func noRankHasTokens(kind: LayoutKind) throws {
        let scenario = Scenario.make(kind, ranks: 3, localExperts: 2, topK: 2, maxTokens: 4, tokenCounts: [0, 0, 0], expert: Self.spread(6))
        try Verify.wholeStep(scenario, .backward)
        let harness = try StepHarness(scenario)
        let infos = try harness.runStep(.forward)
        for d in 0..<3 { #expect(infos[d]!.receivedTotal == 0 && infos[d]!.expertCounters == [0, 0]) }
    }

    @Test("tokens whose every selection is -1 go nowhere and combine to zero", arguments: LayoutKind.allCases)
    func allSelectionsMinusOne(kind: LayoutKind) throws {
        let scenario = Scenario.make(kind, ranks: 3, localExperts: 2, topK: 3, maxTokens: 4, tokenCounts: [4, 2, 3]) { _, _, _ in -1 }
        try Verify.wholeStep(scenario, .backward)
        let harness = try StepHarness(scenario)
        try harness.runStep(.forward)
        for s in 0..<3 { #expect(harness.combined[s].bytes().allSatisfy { $0 == 0 }, "rank \(s)") }
    }

    @Test("every token of every rank to one expert fills that expert's zone in (source, token) order", arguments: LayoutKind.allCases)
    func allTokensToOneExpert(kind: LayoutKind) throws {
        let scenario = Scenario.make(kind, ranks: 4, localExperts: 3, topK: 2, maxTokens: 6, tokenCounts: [6, 5, 6, 1]) { _, _, k in
            k == 0 ? 7 : -1      // expert 7 = rank 2, local expert 1
        }
        try Verify.wholeStep(scenario, .forward)
        try Verify.wholeStep(scenario, .backward)
        let harness = try StepHarness(scenario)
        let infos = try harness.runStep(.forward)
        #expect(infos[2]!.expertCounters == [0, 18, 0])
        #expect(infos[2]!.sourceRankCounters == [6, 5, 6, 1])
        for d in [0, 1, 3] { #expect(infos[d]!.receivedTotal == 0) }
    }

    @Test("every rank at B = Bmax with every column routed", arguments: LayoutKind.allCases)
    func fullBatchesEverywhere(kind: LayoutKind) throws {
        let scenario = Scenario.make(kind, ranks: 3, localExperts: 3, topK: 4, maxTokens: 7, tokenCounts: [7, 7, 7], expert: Self.spread(9))
        try Verify.wholeStep(scenario, .forward)
        try Verify.wholeStep(scenario, .backward)
    }

    @Test("a group of one rank keeps every selection to itself", arguments: LayoutKind.allCases)
    func singleRank(kind: LayoutKind) throws {
        let scenario = Scenario.make(kind, ranks: 1, localExperts: 4, topK: 3, type: .f32, maxTokens: 5, tokenCounts: [5]) { _, t, k in
            t == 2 && k == 1 ? -1 : Int32((t + k) % 4)
        }
        try Verify.wholeStep(scenario, .forward)
        try Verify.wholeStep(scenario, .backward)
    }

    @Test("top-k equal to the number of experts routes every token everywhere", arguments: LayoutKind.allCases)
    func topKEqualsExperts(kind: LayoutKind) throws {
        let scenario = Scenario.make(kind, ranks: 2, localExperts: 2, topK: 4, type: .f16, maxTokens: 3, tokenCounts: [3, 2]) { s, t, k in
            Int32((k + s + t) % 4)
        }
        try Verify.wholeStep(scenario, .forward)
        try Verify.wholeStep(scenario, .backward)
    }

    @Test("the odd shape H = 2880, K = 10, E = 96, R = 6, B = Bmax = 77, bf16", arguments: [LayoutKind.llExpertMajor, .htFlat])
    func oddShape(kind: LayoutKind) throws {
        // Expert of column k of token t on rank s: a scatter that reaches every rank and repeats no expert in a row.
        let scenario = Scenario.make(kind, ranks: 6, localExperts: 16, topK: 10, hidden: 2880, maxTokens: 77,
                                     tokenCounts: Array(repeating: 77, count: 6)) { s, t, k in
            (t + 5 * s) % 13 == 0 && k == 9 ? -1 : Int32((7 * t + 11 * s + 9 * k) % 96)
        }
        try Verify.wholeStep(scenario, .forward)
    }
}
