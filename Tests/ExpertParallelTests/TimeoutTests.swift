import ExpertParallel
import Foundation
import Testing

/// Every wait on another rank is bounded: past the group's timeout the waiting ranks fail with
/// `timeout`, the missing rank is masked inactive, the rest go on without it, and `clean`
/// brings it back.
@Suite("Timeouts")
struct TimeoutTests {
    static let timeout = Duration.milliseconds(400)

    static func scenario(_ kind: LayoutKind = .htFlat) -> Scenario {
        var scenario = Scenario.make(kind, ranks: 3, localExperts: 2, topK: 2, maxTokens: 4, tokenCounts: [3, 4, 2]) { s, t, k in
            Int32((s + 2 * t + 3 * k) % 6)
        }
        scenario.config.timeout = timeout
        return scenario
    }

    @Test("ranks waiting for a rank that never calls get timeout naming it, within the timeout, and it is masked inactive")
    func missingRankTimesOut() throws {
        let harness = try StepHarness(Self.scenario())
        let start = Date()
        let results = harness.update(ranks: [0, 1])
        let elapsed = Date().timeIntervalSince(start)
        for (rank, result) in results { #expect(throws: EPError.timeout(rank: rank, missing: [2])) { try result.get() } }
        #expect(elapsed >= 0.35 && elapsed < 5, "waited \(elapsed) s for a 0.4 s timeout")
        #expect(try harness.group[0].activeRanks.ranks == [0, 1])
    }

    @Test("after a timeout the remaining ranks run whole steps without the missing rank, whose experts count as -1",
          arguments: LayoutKind.allCases)
    func survivorsContinueWithoutMissingRank(kind: LayoutKind) throws {
        let harness = try StepHarness(Self.scenario(kind))
        _ = harness.update(ranks: [0, 1])
        var masked = harness.scenario
        masked.inactive = [2]
        let ref = Reference(masked)
        let infos = try harness.runStep(.backward, ranks: [0, 1])
        for r in [0, 1] {
            var problems = Verify.receivedRows(harness, ref, rank: r) + Verify.info(infos[r]!, ref, rank: r)
                + Verify.combined(harness, ref, rank: r, .backward)
            if kind.algorithm == .highThroughput { problems += Verify.weightGradients(harness, ref, rank: r) }
            expectMatch(problems, masked)
        }
        // The missing rank's late call (the one the others waited for) reports their timeout;
        // its calls after that, that it is masked.
        do {
            try harness.group[2].update(harness.handles[2], topkIdx: harness.topkIdx[2].ref)
            Issue.record("the masked rank's update succeeded")
        } catch {
            guard case .timeout(let waiter, let missing) = error else { Issue.record("\(error)"); return }
            #expect([0, 1].contains(waiter) && missing == [2])
        }
        #expect(throws: EPError.inactiveRank(2)) { try harness.group[2].update(harness.handles[2], topkIdx: harness.topkIdx[2].ref) }
    }

    @Test("after clean, a full step of all ranks is correct again", arguments: LayoutKind.allCases)
    func cleanRestoresFullSteps(kind: LayoutKind) throws {
        let harness = try StepHarness(Self.scenario(kind))
        _ = harness.update(ranks: [0, 1])
        try harness.group[1].clean(ranks: .all(3))
        #expect(try harness.group[0].activeRanks == .all(3))
        harness.poisonOutputs()
        let infos = try harness.runStep(.forward)
        let ref = Reference(harness.scenario)
        for r in 0..<3 {
            expectMatch(Verify.receivedRows(harness, ref, rank: r) + Verify.info(infos[r]!, ref, rank: r)
                        + Verify.combined(harness, ref, rank: r, .forward), harness.scenario)
        }
    }

    @Test("a rank that updates but never dispatches times the others out before they write anything")
    func rankStoppingMidStepTimesOthersOut() throws {
        let harness = try StepHarness(Self.scenario(.llExpertMajor))
        for (_, result) in harness.update() { try result.get() }
        for (rank, result) in harness.dispatch(ranks: [0, 2]) {
            #expect(throws: EPError.timeout(rank: rank, missing: [1])) { _ = try result.get() }
        }
        for r in 0..<3 { expectMatch(Verify.untouched(harness, rank: r), harness.scenario) }
        #expect(try harness.group[0].activeRanks.ranks == [0, 2])
    }

    @Test("the timeout message names the waiting rank and the missing ones")
    func timeoutMessage() {
        let text = EPError.timeout(rank: 4, missing: [1, 6]).description
        #expect(text.contains("rank 4") && text.contains("[1, 6]") && text.contains("masked inactive"))
    }
}
