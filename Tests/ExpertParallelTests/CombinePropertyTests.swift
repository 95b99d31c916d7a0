import ExpertParallel
import PropertyBased
import Testing

/// Dispatch then combine over random routings with stand-in experts (identity in the
/// expert-major layouts; in rank-major and flat, the weighted sum of the row's local selections),
/// compared bit for bit with the reference's float32 fused-multiply-add order.
@Suite("Combine over random routings")
struct CombinePropertyTests {
    @Test("forward combine equals the reference bit for bit", arguments: LayoutKind.allCases)
    func forwardCombineMatchesReference(kind: LayoutKind) async {
        await propertyCheck(count: 30, input: Gen.int(in: 0...1_000_000)) { seed in
            let scenario = Scenario.random(kind, seed: seed)
            let harness = try StepHarness(scenario)
            try harness.runStep(.forward)
            let ref = Reference(scenario)
            for s in scenario.activeRanks { expectMatch(Verify.combined(harness, ref, rank: s, .forward), scenario) }
        }
    }

    @Test("backward combine equals the reference bit for bit (expert-major layouts sum unweighted)", arguments: LayoutKind.allCases)
    func backwardCombineMatchesReference(kind: LayoutKind) async {
        await propertyCheck(count: 25, input: Gen.int(in: 0...1_000_000)) { seed in
            let scenario = Scenario.random(kind, seed: seed)
            let harness = try StepHarness(scenario)
            try harness.runStep(.backward)
            let ref = Reference(scenario)
            for s in scenario.activeRanks { expectMatch(Verify.combined(harness, ref, rank: s, .backward), scenario) }
        }
    }

    @Test("backward HT combine returns each selection's weight gradient from the row or slot that received it, 0 for -1",
          arguments: LayoutKind.highThroughput)
    func backwardCombineReturnsWeightGradients(kind: LayoutKind) async {
        await propertyCheck(count: 30, input: Gen.int(in: 0...1_000_000)) { seed in
            let scenario = Scenario.random(kind, seed: seed)
            let harness = try StepHarness(scenario)
            try harness.runStep(.backward)
            let ref = Reference(scenario)
            for s in scenario.activeRanks { expectMatch(Verify.weightGradients(harness, ref, rank: s), scenario) }
        }
    }

    @Test("a step repeated on the same handles gives the same bytes", arguments: LayoutKind.allCases)
    func repeatedStepIsDeterministic(kind: LayoutKind) async {
        await propertyCheck(count: 10, input: Gen.int(in: 0...1_000_000)) { seed in
            let scenario = Scenario.random(kind, seed: seed)
            let harness = try StepHarness(scenario)
            try harness.runStep(.forward)
            let first = (0..<scenario.ranks).map { harness.combined[$0].bytes() + harness.received[$0].bytes() }
            harness.poisonOutputs()
            try harness.runStep(.forward)
            let second = (0..<scenario.ranks).map { harness.combined[$0].bytes() + harness.received[$0].bytes() }
            #expect(first == second, "\(scenario)")
        }
    }
}
