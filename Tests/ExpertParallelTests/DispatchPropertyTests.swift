import ExpertParallel
import PropertyBased
import Testing

/// Dispatch over random routings (R in 1...8, L in 1...4, K ≤ E, a different B per rank, -1
/// entries, bf16/f16/f32/u8), checked against the brute-force reference.
@Suite("Dispatch over random routings")
struct DispatchPropertyTests {
    static let allPayloads: ScenarioOptions = .init(elementTypes: [.bf16, .f16, .f32, .u8])

    /// Runs update and dispatch on every rank of a random scenario; any error fails the test.
    static func dispatched(_ kind: LayoutKind, seed: Int) throws -> (Scenario, StepHarness, Reference, [Int: LayoutInfo]) {
        let scenario = Scenario.random(kind, seed: seed, allPayloads)
        let harness = try StepHarness(scenario)
        for (_, result) in harness.update() { try result.get() }
        let infos = try harness.dispatch().mapValues { try $0.get() }
        return (scenario, harness, Reference(scenario), infos)
    }

    @Test("every received row is its token's bytes, in its expert or source zone, in (source rank, token) order; padding is zero; other rows are untouched",
          arguments: LayoutKind.allCases)
    func receivedRowsMatchReference(kind: LayoutKind) async {
        await propertyCheck(count: 40, input: Gen.int(in: 0...1_000_000)) { seed in
            let (scenario, harness, ref, _) = try Self.dispatched(kind, seed: seed)
            for d in scenario.activeRanks { expectMatch(Verify.receivedRows(harness, ref, rank: d), scenario) }
        }
    }

    @Test("received topkIdx holds local expert ids (-1 for experts elsewhere and padding) and topkWeights the source's weights (0 there)",
          arguments: [LayoutKind.llRankMajor, .htFlat, .htExpertMajor])
    func receivedRoutingMatchesReference(kind: LayoutKind) async {
        await propertyCheck(count: 30, input: Gen.int(in: 0...1_000_000)) { seed in
            let (scenario, harness, ref, _) = try Self.dispatched(kind, seed: seed)
            for d in scenario.activeRanks { expectMatch(Verify.receivedRouting(harness, ref, rank: d), scenario) }
        }
    }

    @Test("the layout info (expert, source and expert×source counters, offsets, total, dropped) equals the reference",
          arguments: LayoutKind.allCases)
    func layoutInfoMatchesReference(kind: LayoutKind) async {
        await propertyCheck(count: 30, input: Gen.int(in: 0...1_000_000)) { seed in
            let (scenario, _, ref, infos) = try Self.dispatched(kind, seed: seed)
            for d in scenario.activeRanks { expectMatch(Verify.info(infos[d]!, ref, rank: d), scenario) }
        }
    }

    @Test("counters add up: expert counters to the selections of the rank's experts, source counters to the tokens sent to it",
          arguments: LayoutKind.allCases)
    func countersSumToSelections(kind: LayoutKind) async {
        await propertyCheck(count: 20, input: Gen.int(in: 0...1_000_000)) { seed in
            let (scenario, _, _, infos) = try Self.dispatched(kind, seed: seed)
            let c = scenario.config, l = c.localExperts
            for d in 0..<c.ranks {
                let info = infos[d]!
                var selections = 0, tokens = 0
                for s in 0..<c.ranks {
                    for t in 0..<scenario.tokenCounts[s] {
                        let row = scenario.routing[s][t * c.topK..<(t + 1) * c.topK]
                        let here = row.filter { $0 >= 0 && Int($0) / l == d }.count
                        selections += here
                        tokens += here > 0 ? 1 : 0
                    }
                }
                #expect(info.expertCounters.reduce(0, +) == selections, "rank \(d)\n\(scenario)")
                #expect(info.sourceRankCounters.reduce(0, +) == tokens, "rank \(d)\n\(scenario)")
                for local in 0..<l {
                    let perSource = info.expertSourceCounters[local * c.ranks..<(local + 1) * c.ranks]
                    #expect(perSource.reduce(0, +) == info.expertCounters[local], "rank \(d) local expert \(local)\n\(scenario)")
                }
                #expect(info.droppedTokens == 0)
            }
        }
    }
}
