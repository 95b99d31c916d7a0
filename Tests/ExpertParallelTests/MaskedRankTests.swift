import ExpertParallel
import PropertyBased
import Testing

/// A masked (inactive) rank sends nothing and receives nothing: the active ranks treat its
/// experts as -1, and its own threads do not call.
@Suite("Masked ranks")
struct MaskedRankTests {
    @Test("active ranks receive exactly the reference's rows with the masked ranks' experts treated as -1 and their tokens absent",
          arguments: LayoutKind.allCases)
    func maskedRanksNeitherSendNorReceive(kind: LayoutKind) async {
        await propertyCheck(count: 25, input: Gen.int(in: 0...1_000_000)) { seed in
            let scenario = Scenario.random(kind, seed: seed, .init(masksRanks: true))
            let harness = try StepHarness(scenario)
            let infos = try harness.runStep(.backward)
            let ref = Reference(scenario)
            for d in scenario.activeRanks {
                expectMatch(Verify.receivedRows(harness, ref, rank: d), scenario)
                expectMatch(Verify.receivedRouting(harness, ref, rank: d), scenario)
                expectMatch(Verify.info(infos[d]!, ref, rank: d), scenario)
                for s in scenario.inactive { #expect(infos[d]!.sourceRankCounters[s] == 0, "rank \(d) from masked rank \(s)") }
                expectMatch(Verify.combined(harness, ref, rank: d, .backward), scenario)
                if kind.algorithm == .highThroughput { expectMatch(Verify.weightGradients(harness, ref, rank: d), scenario) }
            }
        }
    }

    @Test("forward combine of a masked group equals the reference", arguments: LayoutKind.allCases)
    func maskedForwardCombineMatchesReference(kind: LayoutKind) async {
        await propertyCheck(count: 10, input: Gen.int(in: 0...1_000_000)) { seed in
            let scenario = Scenario.random(kind, seed: seed, .init(masksRanks: true))
            let harness = try StepHarness(scenario)
            try harness.runStep(.forward)
            let ref = Reference(scenario)
            for s in scenario.activeRanks { expectMatch(Verify.combined(harness, ref, rank: s, .forward), scenario) }
        }
    }

    @Test("a masked rank's own update is refused with inactiveRank")
    func maskedRankCannotCall() throws {
        let config = GroupConfig(algorithm: .lowLatency, ranks: 3, experts: 3, topK: 1, hidden: 8, maxTokensPerRank: 2)
        let group = try HostGroup(config)
        try group[0].deactivate(rank: 2)
        #expect(try group[1].activeRanks == RankMask(bits: 0b011))
        let handle = try group[2].makeHandle()
        let idx = try HostTensor(.i32, [0, 1])
        #expect(throws: EPError.inactiveRank(2)) { try group[2].update(handle, topkIdx: idx.ref) }
    }

    @Test("clean makes a masked rank active again")
    func cleanRestoresMaskedRank() throws {
        let group = try HostGroup(GroupConfig(algorithm: .highThroughput, ranks: 4, experts: 8, topK: 2, hidden: 8, maxTokensPerRank: 2))
        try group[0].deactivate(rank: 1)
        try group[0].deactivate(rank: 3)
        #expect(try group[2].activeRanks.ranks == [0, 2])
        try group[0].clean(ranks: RankMask(bits: 0b1000))
        #expect(try group[2].activeRanks.ranks == [0, 2, 3])
        try group[0].clean(ranks: .all(4))
        #expect(try group[2].activeRanks == .all(4))
    }
}
