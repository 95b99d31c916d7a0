import ExpertParallel
import Foundation
import Testing

/// Issue 14, items 1 and 3 on the host backend: sizes a caller controls are bounded before
/// anything is read or allocated for them; host scratch does not grow with `experts` or `hidden`
/// products past what the host holds; calls out of order and rank masks changed mid-step fail at
/// once, by name, rather than after a timeout.
@Suite("Reliability")
struct ReliabilityTests {
    static func scenario(_ kind: LayoutKind = .llExpertMajor, timeout: Duration = .seconds(5)) -> Scenario {
        var scenario = Scenario.make(kind, ranks: 3, localExperts: 2, topK: 2, maxTokens: 4, tokenCounts: [3, 4, 2]) { s, t, k in
            Int32((s + 2 * t + 3 * k) % 6)
        }
        scenario.config.timeout = timeout
        return scenario
    }

    // MARK: 1. validate before allocating or reading

    @Test("a topkIdx with more rows than maxTokensPerRank is refused by its row count, before any row is read")
    func tooManyRowsAreRefusedBeforeReading() throws {
        let config = Self.scenario().config   // maxTokensPerRank 4, topK 2
        // The caller's buffer holds 4 valid rows, then a row that is not routing at all.
        let buffer = try HostTensor(.i32, [5, 2])
        try buffer.copy(from: [Int32](repeating: 0, count: 8).enumerated().map { Int32($0.offset % 2) } + [999, 999])
        var claimed = buffer.ref
        claimed.shape = [5, 2]
        #expect(throws: EPError.invalidArgument(
            field: "topkIdx.shape[0] (tokens)", value: "5", requirement: "must be in 0...maxTokensPerRank (4)")) {
            _ = try RoutingTable(topkIdx: claimed, config: config)
        }
        // A row count no buffer could hold is refused the same way (nothing allocated for it).
        claimed.shape = [1 << 40, 2]
        #expect(throws: EPError.invalidArgument(
            field: "topkIdx.shape[0] (tokens)", value: "\(1 << 40)", requirement: "must be in 0...maxTokensPerRank (4)")) {
            _ = try RoutingTable(topkIdx: claimed, config: config)
        }
    }

    @Test("a config whose per-step host routing metadata cannot fit in this host is refused at creation with outOfMemory naming it and the bytes")
    func hugeExpertCountIsOutOfMemory() {
        let config = GroupConfig(algorithm: .highThroughput, ranks: 64, experts: 64 << 24, topK: 1, hidden: 2,
                                 elementType: .f32, maxTokensPerRank: 1, maxReceivedTokensPerRank: 1, layout: .flat)
        let bytes = config.hostStepBytes(tokens: 0)
        #expect(bytes == 64 * 8 * 6 * ((64 << 24) + 64))
        do {
            _ = try HostGroup(config)
            Issue.record("a group needing \(bytes) bytes of host metadata was made")
        } catch {
            guard case let .outOfMemory(buffer, reported, available) = error else {
                Issue.record("expected outOfMemory, got \(error)")
                return
            }
            #expect(reported == bytes && available < bytes)
            #expect(buffer.contains("routing metadata") && buffer.contains("experts \(64 << 24)"))
            #expect(error.description.hasPrefix("out of memory: the host backend's routing metadata"))
            #expect(error.description.contains("\(bytes) bytes (") && error.description.contains("GiB"))
        }
    }

    @Test("combine reduces wide rows in pieces: hidden past one piece matches the reference bit for bit",
          arguments: LayoutKind.allCases)
    func wideRowsCombineInPieces(kind: LayoutKind) throws {
        let hidden = HostRank.combinePiece + 8
        let scenario = Scenario.make(kind, ranks: 2, localExperts: 2, topK: 2, hidden: hidden, maxTokens: 2, tokenCounts: [2, 1]) { s, t, k in
            Int32((s + t + k) % 4)
        }
        let harness = try StepHarness(scenario)
        let infos = try harness.runStep(.forward)
        let ref = Reference(scenario)
        for r in 0..<2 {
            expectMatch(Verify.info(infos[r]!, ref, rank: r) + Verify.combined(harness, ref, rank: r, .forward), scenario)
        }
    }

    // MARK: 3. order and messages

    @Test("combine right after update, with no dispatch, is wrongOrder on every rank and writes nothing")
    func combineWithoutDispatchIsWrongOrder() throws {
        let harness = try StepHarness(Self.scenario())
        for (_, result) in harness.update() { try result.get() }
        for (rank, result) in harness.combine() {
            #expect(throws: EPError.wrongOrder("combine needs a dispatch of this handle's step first: update, dispatch, then combine"),
                    "rank \(rank)") { try result.get() }
        }
        for r in 0..<3 { expectMatch(Verify.untouched(harness, rank: r), harness.scenario) }
        // A dispatch opens the combine; a new update closes it again.
        _ = try harness.dispatch().mapValues { try $0.get() }
        for (_, result) in harness.combine() { try result.get() }
        for (_, result) in harness.update() { try result.get() }
        for (_, result) in harness.combine() { #expect(throws: EPError.self) { try result.get() } }
    }

    @Test("combine without dispatch is wrongOrder through StepGroup too")
    func groupCombineWithoutDispatchIsWrongOrder() throws {
        let scenario = Self.scenario()
        let group = try HostGroup(scenario.config)
        let slot = try StepHarness(scenario)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: slot.routingArguments)
        #expect(throws: EPError.wrongOrder("combine needs a dispatch of this handle's step first: update, dispatch, then combine")) {
            try group.combine(handle, slot.combineInputs(.forward), into: slot.combineOutputs(.forward))
        }
        try group.dispatch(handle, slot.dispatchInputs, into: slot.dispatchOutputs)
        try group.combine(handle, slot.combineInputs(.forward), into: slot.combineOutputs(.forward))
    }

    @Test("a timeout under 1 ns is refused, echoed as given (not rounded to 0)")
    func subNanosecondTimeoutIsEchoed() {
        var config = Self.scenario().config
        config.timeout = .seconds(1e-12)
        #expect(throws: EPError.invalidConfig(field: "timeout", value: "\(Duration.seconds(1e-12))", requirement: "must be ≥ 1 nanosecond")) {
            _ = try HostGroup(config)
        }
        #expect("\(Duration.seconds(1e-12))" != "0.0 seconds")
        config.timeout = .nanoseconds(1)
        #expect(throws: Never.self) { _ = try HostGroup(config) }
    }

    @Test("a rank that arrives after a peer timed out waiting for it reports that timeout, naming the peers, not only 'masked inactive'")
    func lateRankReportsTheTimeout() throws {
        let harness = try StepHarness(Self.scenario(timeout: .milliseconds(200)))
        let early = harness.update(ranks: [0, 2])
        for (rank, result) in early { #expect(throws: EPError.timeout(rank: rank, missing: [1])) { try result.get() } }
        let late = harness.update(ranks: [1])
        // The error of the first of the waiting ranks to give up on it.
        if case .failure(.timeout(let waiter, let missing)) = late[1]! {
            #expect([0, 2].contains(waiter) && missing == [1])
        } else {
            Issue.record("the late rank reported \(String(describing: late[1]))")
        }
        // Its next call (a later round) is refused as a masked rank's.
        #expect(throws: EPError.inactiveRank(1)) { try harness.group[1].update(harness.handles[1], topkIdx: harness.topkIdx[1].ref) }
        // After clean, a whole step runs again.
        try harness.group[0].clean(ranks: .all(3))
        try harness.runStep()
    }

    @Test("a rank deactivated between update and dispatch: the others' dispatch fails at once with wrongOrder, not after the timeout")
    func deactivateBetweenUpdateAndDispatch() throws {
        let harness = try StepHarness(Self.scenario(timeout: .seconds(20)))
        for (_, result) in harness.update() { try result.get() }
        try harness.group[0].deactivate(rank: 1)
        let start = Date()
        let results = harness.dispatch(ranks: [0, 1, 2])
        #expect(Date().timeIntervalSince(start) < 5)
        for r in [0, 2] {
            #expect(throws: EPError.wrongOrder("the active ranks went from [0, 1, 2] to [0, 2] since this handle's update; update it again before dispatch or combine")) {
                _ = try results[r]!.get()
            }
        }
        #expect(throws: EPError.inactiveRank(1)) { _ = try results[1]!.get() }
        for r in 0..<3 { expectMatch(Verify.untouched(harness, rank: r), harness.scenario) }
        // Updated again without rank 1, the step runs and matches the reference with it masked.
        var masked = harness.scenario
        masked.inactive = [1]
        let infos = try harness.runStep(ranks: [0, 2])
        let ref = Reference(masked)
        for r in [0, 2] { expectMatch(Verify.info(infos[r]!, ref, rank: r) + Verify.combined(harness, ref, rank: r, .forward), masked) }
    }

    @Test("a rank deactivated between dispatch and combine: combine fails at once with wrongOrder, not after the timeout")
    func deactivateBetweenDispatchAndCombine() throws {
        let harness = try StepHarness(Self.scenario(timeout: .seconds(20)))
        for (_, result) in harness.update() { try result.get() }
        _ = try harness.dispatch().mapValues { try $0.get() }
        try harness.group[2].deactivate(rank: 1)
        harness.combined.forEach { $0.fill(byte: StepHarness.poison) }
        let start = Date()
        let results = harness.combine(ranks: [0, 1, 2])
        #expect(Date().timeIntervalSince(start) < 5)
        for r in [0, 2] { #expect(throws: EPError.self) { try results[r]!.get() } }
        if case .failure(.wrongOrder(let message)) = results[0]! {
            #expect(message.contains("active ranks went from [0, 1, 2] to [0, 2]"))
        } else {
            Issue.record("rank 0: \(String(describing: results[0]))")
        }
        #expect(throws: EPError.inactiveRank(1)) { try results[1]!.get() }
        for r in 0..<3 { #expect(harness.combined[r].bytes().allSatisfy { $0 == StepHarness.poison }, "rank \(r) wrote") }
    }

    @Test("a rank deactivated while the others wait for it in a call ends their wait at once with wrongOrder")
    func deactivateDuringAWait() throws {
        let harness = try StepHarness(Self.scenario(timeout: .seconds(20)))
        for (_, result) in harness.update() { try result.get() }
        let group = harness.group
        let killer = Thread {
            Thread.sleep(forTimeInterval: 0.3)
            group.ranks[0].deactivate(rank: 1)
        }
        killer.start()
        let start = Date()
        let results = harness.dispatch(ranks: [0, 2])   // rank 1 never calls
        #expect(Date().timeIntervalSince(start) < 5)
        for r in [0, 2] {
            guard case .failure(.wrongOrder(let message)) = results[r]! else {
                Issue.record("rank \(r): \(String(describing: results[r]))")
                continue
            }
            #expect(message.contains("rank(s) [1] were masked inactive"), "\(message)")
        }
    }

    @Test("deactivate(rank:) with a rank outside the group is ignored, as clean ignores them; RankMask ignores ranks outside 0..<64")
    func deactivateOutOfRangeIsIgnored() throws {
        let harness = try StepHarness(Self.scenario())
        for rank in [-1, -64, 3, 64, Int.max, Int.min] { try harness.group[0].deactivate(rank: rank) }
        #expect(try harness.group[0].activeRanks == .all(3))
        var mask = RankMask.all(3)
        mask.remove(-5)
        mask.insert(70)
        mask.insert(-1)
        #expect(mask == .all(3))
        try harness.runStep()
    }
}
