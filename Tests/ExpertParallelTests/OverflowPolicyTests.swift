import ExpertParallel
import PropertyBased
import Testing

/// HT receive capacity N below what the routing needs: `.drop` keeps (token, rank) pairs in
/// (source rank, token) order while the buffer still fits them and counts the rest; `.fail`
/// throws `overflow` on every rank.
@Suite("Overflow policies")
struct OverflowPolicyTests {
    @Test("drop keeps exactly the reference's prefix of pairs, counts the dropped ones, and combine omits them",
          arguments: LayoutKind.highThroughput)
    func dropKeepsPrefixInSourceTokenOrder(kind: LayoutKind) async {
        await propertyCheck(count: 40, input: Gen.int(in: 0...1_000_000)) { seed in
            let scenario = Scenario.random(kind, seed: seed, .init(overflow: .drop))
            let harness = try StepHarness(scenario)
            let infos = try harness.runStep(.backward)
            let ref = Reference(scenario)
            for d in scenario.activeRanks {
                expectMatch(Verify.receivedRows(harness, ref, rank: d), scenario)
                expectMatch(Verify.receivedRouting(harness, ref, rank: d), scenario)
                expectMatch(Verify.info(infos[d]!, ref, rank: d), scenario)
                #expect(infos[d]!.receivedTotal <= scenario.config.receiveCapacity)
                expectMatch(Verify.combined(harness, ref, rank: d, .backward), scenario)
                expectMatch(Verify.weightGradients(harness, ref, rank: d), scenario)
            }
        }
    }

    @Test("drop: forward combine of the kept rows equals the reference", arguments: LayoutKind.highThroughput)
    func dropForwardCombineMatchesReference(kind: LayoutKind) async {
        await propertyCheck(count: 15, input: Gen.int(in: 0...1_000_000)) { seed in
            let scenario = Scenario.random(kind, seed: seed, .init(overflow: .drop))
            let harness = try StepHarness(scenario)
            try harness.runStep(.forward)
            let ref = Reference(scenario)
            for s in scenario.activeRanks { expectMatch(Verify.combined(harness, ref, rank: s, .forward), scenario) }
        }
    }

    @Test("fail: every rank's update throws the same overflow (lowest overflowing rank, rows required, capacity); when all fits, nothing is dropped",
          arguments: LayoutKind.highThroughput)
    func failThrowsOverflowOnEveryRank(kind: LayoutKind) async {
        await propertyCheck(count: 30, input: Gen.int(in: 0...1_000_000)) { seed in
            let scenario = Scenario.random(kind, seed: seed, .init(overflow: .fail))
            let harness = try StepHarness(scenario)
            let results = harness.update()
            let ref = Reference(scenario)
            for (rank, result) in results {
                if let error = ref.overflowError {
                    #expect(throws: error, "rank \(rank)\n\(scenario)") { try result.get() }
                } else {
                    #expect(throws: Never.self, "rank \(rank)\n\(scenario)") { try result.get() }
                }
            }
            guard ref.overflowError == nil else { return }
            // Everything fits (sometimes exactly): the step is the reference's, nothing dropped.
            let infos = try harness.dispatch().mapValues { try $0.get() }
            for d in scenario.activeRanks {
                expectMatch(Verify.receivedRows(harness, ref, rank: d), scenario)
                expectMatch(Verify.info(infos[d]!, ref, rank: d), scenario)
            }
        }
    }

    @Test("fail: after an overflowing first update, dispatch reports wrongOrder and writes nothing")
    func failedUpdateLeavesNoStep() throws {
        let scenario = HandWorkedExample.scenario(.htFlat, capacity: 2)
        let harness = try StepHarness(scenario)
        for (_, result) in harness.update() {
            #expect(throws: EPError.overflow(rank: 0, required: 3, capacity: 2)) { try result.get() }
        }
        let reason = EPError.overflow(rank: 0, required: 3, capacity: 2).description
        for (_, result) in harness.dispatch() {
            #expect(throws: EPError.wrongOrder("the last update of this handle failed (\(reason)); update again before dispatch or combine")) { try result.get() }
        }
        for r in 0..<2 { expectMatch(Verify.untouched(harness, rank: r), scenario) }
    }

    @Test("the overflow message names the rank, the rows required and the capacity")
    func overflowMessageNamesRankRequiredAndCapacity() {
        let text = EPError.overflow(rank: 3, required: 41, capacity: 40).description
        #expect(text.contains("rank 3") && text.contains("41") && text.contains("40") && text.contains("maxReceivedTokensPerRank"))
    }
}
