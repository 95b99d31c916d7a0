import ExpertParallel
import Testing

/// A call rejected on one rank is rejected on every rank of the step: that rank reports its own
/// error, the others `peerFailed` naming it; no rank writes any output; the handles stay usable
/// (after a rejected update, once a good update has run), so the next good call gives the
/// reference's results.
@Suite("Rejected calls")
struct FailedCallTests {
    static func scenario(_ kind: LayoutKind) -> Scenario {
        Scenario.make(kind, ranks: 3, localExperts: 2, topK: 2, maxTokens: 4, tokenCounts: [3, 4, 2]) { s, t, k in
            Int32((s + 2 * t + 3 * k) % 6)
        }
    }

    static func expectPeerFailed(_ results: [Int: Result<some Any, EPError>], bad: Int, _ error: EPError,
                                 sourceLocation: SourceLocation = #_sourceLocation) {
        for (rank, result) in results {
            let expected = rank == bad ? error : .peerFailed(rank: rank, peer: bad, reason: error.description)
            #expect(throws: expected, "rank \(rank)", sourceLocation: sourceLocation) { _ = try result.get() }
        }
    }

    @Test("a dispatch rejected on one rank writes nothing anywhere, the others report peerFailed, and a retry is correct",
          arguments: LayoutKind.allCases)
    func rejectedDispatchWritesNothing(kind: LayoutKind) throws {
        let harness = try StepHarness(Self.scenario(kind))
        for (_, result) in harness.update() { try result.get() }
        let wrong = try HostTensor(harness.config.elementType, [5, harness.config.hidden])
        let results = harness.onRanks { rank, handle throws(EPError) in
            var input = harness.dispatchInput(rank.rank)
            if rank.rank == 1 { input.tokens = wrong.ref }
            return try rank.dispatch(handle, input, into: harness.dispatchOutput(rank.rank), direction: .forward)
        }
        let error = EPError.invalidArgument(field: "input.tokens.shape", value: "[5, 16]", requirement: "must be [4, 16]")
        Self.expectPeerFailed(results, bad: 1, error)
        for r in 0..<3 { expectMatch(Verify.untouched(harness, rank: r), harness.scenario) }

        // The same handles, without a new update: a good dispatch and combine give the reference.
        let ref = Reference(harness.scenario)
        let infos = try harness.dispatch().mapValues { try $0.get() }
        harness.runExperts(infos)
        for (_, result) in harness.combine() { try result.get() }
        for r in 0..<3 {
            expectMatch(Verify.receivedRows(harness, ref, rank: r) + Verify.info(infos[r]!, ref, rank: r)
                        + Verify.combined(harness, ref, rank: r, .forward), harness.scenario)
        }
    }

    @Test("a combine rejected on one rank writes nothing anywhere, the others report peerFailed, and a retry is correct",
          arguments: LayoutKind.allCases)
    func rejectedCombineWritesNothing(kind: LayoutKind) throws {
        let harness = try StepHarness(Self.scenario(kind))
        for (_, result) in harness.update() { try result.get() }
        let infos = try harness.dispatch(.backward).mapValues { try $0.get() }
        harness.runExperts(infos)
        let results = harness.onRanks { rank, handle throws(EPError) in
            var output = harness.combineOutput(rank.rank, .backward)
            if rank.rank == 2 { output.tokens = output.tokens.with(location: .device(0)) }
            try rank.combine(handle, harness.combineInput(rank.rank, .backward), into: output, direction: .backward)
        }
        let error = EPError.invalidArgument(field: "output.tokens.location", value: "device(0)", requirement: "must be host")
        Self.expectPeerFailed(results, bad: 2, error)
        for r in 0..<3 {
            #expect(harness.combined[r].bytes().allSatisfy { $0 == StepHarness.poison }, "rank \(r) combine tokens")
            if let g = harness.combinedWeightGradients[r] { #expect(g.bytes().allSatisfy { $0 == StepHarness.poison }, "rank \(r) gradients") }
        }

        let ref = Reference(harness.scenario)
        for (_, result) in harness.combine(.backward) { try result.get() }
        for r in 0..<3 {
            var problems = Verify.combined(harness, ref, rank: r, .backward)
            if kind.algorithm == .highThroughput { problems += Verify.weightGradients(harness, ref, rank: r) }
            expectMatch(problems, harness.scenario)
        }
    }

    @Test("an update rejected on one rank voids the step on every rank until a good update", arguments: LayoutKind.allCases)
    func rejectedUpdateVoidsTheStep(kind: LayoutKind) throws {
        let harness = try StepHarness(Self.scenario(kind))
        for (_, result) in harness.update() { try result.get() }
        // A new step: ranks 0 and 2 route one token each, rank 1's routing is invalid.
        let fresh = try HostTensor(.i32, [1, 2])
        try fresh.copy(from: [Int32(5), 0])
        let invalid = try HostTensor(.i32, [1, 2])
        try invalid.copy(from: [Int32(6), 0])
        let results = harness.onRanks { rank, handle throws(EPError) in
            try rank.update(handle, topkIdx: rank.rank == 1 ? invalid.ref : fresh.ref)
        }
        let error = EPError.invalidArgument(field: "topkIdx[0][0]", value: "6", requirement: "must be -1 or in [0, 6)")
        Self.expectPeerFailed(results, bad: 1, error)

        // No rank moves this step's tokens with the previous step's routing (the GPU backends
        // void a failed step the same way): dispatch and combine fail and write nothing.
        for (rank, result) in harness.dispatch() {
            guard case .failure(.wrongOrder(let message)) = result else {
                Issue.record("rank \(rank): expected wrongOrder, got \(result)")
                continue
            }
            #expect(message.contains("last update of this handle failed"), "rank \(rank): \(message)")
        }
        for (rank, result) in harness.combine() {
            #expect(throws: EPError.self, "rank \(rank)") { try result.get() }
        }
        for r in 0..<3 { expectMatch(Verify.untouched(harness, rank: r), harness.scenario) }

        // A good update makes the handles usable again.
        let ref = Reference(harness.scenario)
        for (_, result) in harness.update() { try result.get() }
        let infos = try harness.dispatch().mapValues { try $0.get() }
        harness.runExperts(infos)
        for (_, result) in harness.combine() { try result.get() }
        for r in 0..<3 {
            expectMatch(Verify.receivedRows(harness, ref, rank: r) + Verify.combined(harness, ref, rank: r, .forward), harness.scenario)
        }
    }

    @Test("a call with another rank's handle is reported to the other ranks as peerFailed, not left to time out")
    func foreignHandleIsReportedToPeers() throws {
        var scenario = Self.scenario(.htFlat)
        scenario.config.timeout = .milliseconds(500)      // a regression would make the peers wait this long
        let harness = try StepHarness(scenario)
        for (_, result) in harness.update() { try result.get() }
        let results = harness.onRanks { rank, handle throws(EPError) in
            try rank.dispatch(rank.rank == 0 ? harness.handles[1] : handle, harness.dispatchInput(rank.rank),
                              into: harness.dispatchOutput(rank.rank), direction: .forward)
        }
        let error = EPError.invalidArgument(field: "handle", value: "handle of rank 1", requirement: "must be rank 0's own handle")
        #expect(throws: error) { _ = try results[0]!.get() }
        for r in 0..<3 { expectMatch(Verify.untouched(harness, rank: r), scenario) }
        do {
            for r in [1, 2] {
                #expect(throws: EPError.peerFailed(rank: r, peer: 0, reason: error.description)) { _ = try results[r]!.get() }
            }
            #expect(try harness.group[0].activeRanks == .all(3))
        }
    }

    @Test("peerFailed names the rank, the peer and the peer's reason")
    func peerFailedMessage() {
        let reason = EPError.invalidArgument(field: "input.tokens.shape", value: "[5, 16]", requirement: "must be [4, 16]").description
        let text = EPError.peerFailed(rank: 0, peer: 1, reason: reason).description
        #expect(text.contains("rank 0") && text.contains("rank 1") && text.contains("input.tokens.shape = [5, 16]"), "\(text)")
    }
}
