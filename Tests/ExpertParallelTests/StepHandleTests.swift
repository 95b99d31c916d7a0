import ExpertParallel
import Foundation
import Testing

/// `HostGroup` as a `StepGroup`: one call runs a step's update, dispatch or combine for all R
/// ranks, and several step handles (MoE layers, micro-batches, a backward pass) can be live at
/// once. Each handle keeps its own routing: whatever was updated or dispatched in between, a
/// handle's calls give, bit for bit, what a fresh group running that step alone gives, and what
/// the brute-force reference says.
@Suite("StepHandle: many live steps on one host group")
struct StepHandleTests {
    // MARK: Interleaved handles

    @Test("two interleaved handles (update A, update B, dispatch A, dispatch B, combine B, combine A, backward dispatch and combine A) each give what its step alone gives",
          arguments: LayoutKind.allCases, [DataType.bf16, .f32])
    func interleavedHandlesMatchTheirStepsAlone(kind: LayoutKind, type: DataType) throws {
        let stepA = Self.scenario(kind, seed: 11, type: type), stepB = Self.scenario(kind, seed: 22, type: type)
        try #require(stepA.routing != stepB.routing, "the two steps must route differently")
        let group = try HostGroup(stepA.config)
        // Three buffer slots: A's forward, B's forward, A's backward. Each holds its step's inputs
        // and receives its outputs; all start poisoned.
        let slotA = try StepHarness(stepA), slotB = try StepHarness(stepB), slotABack = try StepHarness(stepA)
        let a = try group.makeHandle(), b = try group.makeHandle()

        try group.update(a, topkIdx: slotA.routingArguments)
        try group.update(b, topkIdx: slotB.routingArguments)
        try group.dispatch(a, slotA.dispatchInputs, into: slotA.dispatchOutputs)
        try group.dispatch(b, slotB.dispatchInputs, into: slotB.dispatchOutputs)
        let infosA = try Self.layoutInfos(group, a), infosB = try Self.layoutInfos(group, b)
        slotA.runExperts(infosA)
        slotB.runExperts(infosB)
        try group.combine(b, slotB.combineInputs(.forward), into: slotB.combineOutputs(.forward))
        try group.combine(a, slotA.combineInputs(.forward), into: slotA.combineOutputs(.forward))
        try group.dispatch(a, slotABack.dispatchInputs, into: slotABack.dispatchOutputs, direction: .backward)
        let infosABack = try Self.layoutInfos(group, a)
        slotABack.runExperts(infosABack)
        try group.combine(a, slotABack.combineInputs(.backward), into: slotABack.combineOutputs(.backward), direction: .backward)

        for (slot, infos, direction) in [(slotA, infosA, PassDirection.forward), (slotB, infosB, .forward), (slotABack, infosABack, .backward)] {
            let alone = try StepHarness(slot.scenario)
            let aloneInfos = try alone.runStep(direction)
            let ref = Reference(slot.scenario)
            for r in 0..<slot.config.ranks {
                expectMatch(Self.differences(slot, alone, rank: r), slot.scenario)
                #expect(infos[r] == aloneInfos[r], "rank \(r) \(direction) layout info differs from the step alone")
                expectMatch(Verify.receivedRows(slot, ref, rank: r), slot.scenario)
                expectMatch(Verify.receivedRouting(slot, ref, rank: r), slot.scenario)
                expectMatch(Verify.info(infos[r]!, ref, rank: r), slot.scenario)
                expectMatch(Verify.combined(slot, ref, rank: r, direction), slot.scenario)
                if direction == .backward && kind.algorithm == .highThroughput {
                    expectMatch(Verify.weightGradients(slot, ref, rank: r), slot.scenario)
                }
            }
        }
    }

    // MARK: Many layers, one buffer slot

    @Test("16 layers' handles updated up front, then dispatched in turn into one shared buffer slot with identity experts: every layer combines to what it gives alone",
          arguments: LayoutKind.allCases)
    func sixteenLiveHandlesShareOneBufferSlot(kind: LayoutKind) throws {
        let layers = (0..<16).map { Self.scenario(kind, seed: 100 + $0) }
        let config = layers[0].config
        let group = try HostGroup(config)
        let slot = try BufferSlot(config)
        let inputs = try layers.map { try StepHarness($0) }   // each layer's tokens, routing, weights and combine output
        let handles = try layers.map { _ in try group.makeHandle() }
        for (handle, layer) in zip(handles, inputs) { try group.update(handle, topkIdx: layer.routingArguments) }

        for (l, (handle, layer)) in zip(handles, inputs).enumerated() {
            try group.dispatch(handle, layer.dispatchInputs, into: slot.dispatchOutputs)
            let infos = try Self.layoutInfos(group, handle)
            try group.combine(handle, slot.identityCombineInputs(layer), into: layer.combineOutputs(.forward))

            let (alone, aloneInfos) = try Self.aloneWithIdentityExperts(layers[l])
            let ref = Reference(layers[l])
            for r in 0..<config.ranks {
                let context = "layer \(l)"
                #expect(infos[r] == aloneInfos[r], "\(context): rank \(r) layout info differs from the layer alone")
                expectMatch(Verify.info(infos[r]!, ref, rank: r), layers[l])
                expectMatch(slot.receivedZoneDifferences(alone, ref, rank: r).map { "\(context): \($0)" }, layers[l])
                #expect(layer.combined[r].bytes() == alone.combined[r].bytes(), "\(context): rank \(r) combine differs from the layer alone")
                #expect(layer.combined[r].bytes() == Self.identityCombined(ref, r), "\(context): rank \(r) combine differs from the reference")
            }
        }
    }

    // MARK: Handle life and layout info

    @Test("a released handle is refused with wrongOrder by every call, naming the release", arguments: LayoutKind.allCases)
    func releasedHandleIsRefused(kind: LayoutKind) throws {
        let step = Self.scenario(kind, seed: 5)
        let group = try HostGroup(step.config)
        let slot = try StepHarness(step)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: slot.routingArguments)
        try group.dispatch(handle, slot.dispatchInputs, into: slot.dispatchOutputs)
        handle.release()
        #expect(handle.isReleased)
        slot.poisonOutputs()

        let calls: [(String, () throws -> Void)] = [
            ("dispatch", { try group.dispatch(handle, slot.dispatchInputs, into: slot.dispatchOutputs) }),
            ("update", { try group.update(handle, topkIdx: slot.routingArguments) }),
            ("combine", { try group.combine(handle, slot.combineInputs(.forward), into: slot.combineOutputs(.forward)) }),
            ("layoutInfo", { _ = try group.layoutInfo(handle, rank: 0) }),
        ]
        for (name, call) in calls {
            let error = #expect(throws: EPError.self, "\(name) with a released handle") { try call() }
            guard case .wrongOrder(let message)? = error else {
                Issue.record("\(name): expected wrongOrder, got \(String(describing: error))")
                continue
            }
            #expect(message.contains("released"), "\(name): \(message)")
        }
        for r in 0..<step.config.ranks { expectMatch(Verify.untouched(slot, rank: r), step) }
        handle.release()   // releasing twice is harmless
    }

    @Test("layoutInfo(handle, rank:) is what that handle's last dispatch received on that rank; none before a dispatch or after a new update",
          arguments: LayoutKind.allCases)
    func layoutInfoIsTheHandlesOwnDispatch(kind: LayoutKind) throws {
        let stepA = Self.scenario(kind, seed: 31), stepB = Self.scenario(kind, seed: 32)
        let group = try HostGroup(stepA.config)
        let slotA = try StepHarness(stepA), slotB = try StepHarness(stepB)
        let a = try group.makeHandle(), b = try group.makeHandle()
        try group.update(a, topkIdx: slotA.routingArguments)
        Self.expectWrongOrder(mentioning: "no layout info") { _ = try group.layoutInfo(a, rank: 0) }

        try group.update(b, topkIdx: slotB.routingArguments)
        try group.dispatch(a, slotA.dispatchInputs, into: slotA.dispatchOutputs)
        try group.dispatch(b, slotB.dispatchInputs, into: slotB.dispatchOutputs)
        for (handle, step) in [(a, stepA), (b, stepB)] {
            let alone = try StepHarness(step)
            for (_, result) in alone.update() { try result.get() }
            let aloneInfos = try alone.dispatch().mapValues { try $0.get() }
            let ref = Reference(step)
            for r in 0..<step.config.ranks {
                let info = try group.layoutInfo(handle, rank: r)
                #expect(info == aloneInfos[r], "rank \(r): the handle's info differs from its dispatch's")
                expectMatch(Verify.info(info, ref, rank: r), step)
            }
        }
        #expect(throws: EPError.invalidArgument(field: "rank", value: "4", requirement: "must be in 0..<4 (localRanks)")) {
            _ = try group.layoutInfo(a, rank: 4)
        }

        try group.update(a, topkIdx: slotB.routingArguments)   // a new step on handle A: its old info is stale
        Self.expectWrongOrder(mentioning: "no layout info") { _ = try group.layoutInfo(a, rank: 1) }
        #expect(try group.layoutInfo(b, rank: 1) == (try Self.layoutInfos(group, b))[1])
    }

    @Test("a rank masked during a dispatch moves nothing, its layout info and asked-for counts are zeros (as the GPU's); the active ranks match the reference with it masked")
    func maskedRankReceivesNothing() throws {
        var step = Self.scenario(.htFlat, seed: 41)
        step.inactive = [2]
        let group = try HostGroup(step.config)
        try group.deactivate(rank: 2)
        #expect(try group.activeRanks == RankMask(bits: 0b1011))
        let slot = try StepHarness(step)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: slot.routingArguments)
        let l = step.config.localExperts, ranks = step.config.ranks
        let counts = try HostTensor(.i32, [l]), sourceCounts = try HostTensor(.i32, [l, ranks])
        counts.fill(byte: 0x5A)
        sourceCounts.fill(byte: 0x5A)
        var outputs = slot.dispatchOutputs
        outputs[2].expertCounts = counts.ref
        outputs[2].expertSourceCounts = sourceCounts.ref
        try group.dispatch(handle, slot.dispatchInputs, into: outputs)
        let ref = Reference(step)
        for r in [0, 1, 3] {
            expectMatch(Verify.info(try group.layoutInfo(handle, rank: r), ref, rank: r), step)
            expectMatch(Verify.receivedRows(slot, ref, rank: r), step)
        }
        #expect(try group.layoutInfo(handle, rank: 2) == LayoutInfo.empty(step.config))
        #expect(try counts.array(of: Int32.self) == Array(repeating: 0, count: l))
        #expect(try sourceCounts.array(of: Int32.self) == Array(repeating: 0, count: l * ranks))
        expectMatch(Verify.untouched(slot, rank: 2), step)
        try group.clean(ranks: .all(4))
        #expect(try group.activeRanks == .all(4))
    }

    @Test("a step's ranks are those active at its update: after a rank is masked or clean() is called, dispatch and combine fail at once with wrongOrder until the handle is updated again")
    func maskChangeSinceUpdateNeedsANewUpdate() throws {
        let step = Self.scenario(.llExpertMajor, seed: 45)
        var masked = step
        masked.inactive = [2]
        let group = try HostGroup(step.config)
        let slot = try StepHarness(step), maskedSlot = try StepHarness(masked)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: slot.routingArguments)
        try group.dispatch(handle, slot.dispatchInputs, into: slot.dispatchOutputs)

        try group.deactivate(rank: 2)   // as when rank 2 is found dead between dispatch and combine
        Self.expectWrongOrder(mentioning: "active ranks went from [0, 1, 2, 3] to [0, 1, 3]") {
            try group.combine(handle, slot.combineInputs(.forward), into: slot.combineOutputs(.forward))
        }
        try group.update(handle, topkIdx: maskedSlot.routingArguments)
        try group.dispatch(handle, maskedSlot.dispatchInputs, into: maskedSlot.dispatchOutputs)
        try group.combine(handle, maskedSlot.combineInputs(.forward), into: maskedSlot.combineOutputs(.forward))
        let maskedRef = Reference(masked)
        for r in [0, 1, 3] { expectMatch(Verify.combined(maskedSlot, maskedRef, rank: r, .forward), masked) }

        try group.clean(ranks: .all(4))   // rank 2's per-rank handle still holds the first step
        Self.expectWrongOrder(mentioning: "clean() was called") {
            try group.dispatch(handle, slot.dispatchInputs, into: slot.dispatchOutputs)
        }
        slot.poisonOutputs()
        try group.update(handle, topkIdx: slot.routingArguments)
        try group.dispatch(handle, slot.dispatchInputs, into: slot.dispatchOutputs)
        try group.combine(handle, slot.combineInputs(.forward), into: slot.combineOutputs(.forward))
        let ref = Reference(step)
        for r in 0..<4 { expectMatch(Verify.combined(slot, ref, rank: r, .forward), step) }
    }

    // MARK: Errors

    @Test("per-rank arrays of the wrong length are refused before any rank runs, naming the array and R")
    func countMismatchNamesTheField() throws {
        let step = Self.scenario(.htExpertMajor, seed: 51)
        let group = try HostGroup(step.config)
        let slot = try StepHarness(step)
        let handle = try group.makeHandle()
        func wrongCount(_ field: String, _ count: Int) -> EPError {
            .invalidArgument(field: field, value: "\(count)", requirement: "must be ranks (4): one per rank")
        }
        #expect(throws: wrongCount("topkIdx.count", 3)) { try group.update(handle, topkIdx: Array(slot.routingArguments.prefix(3))) }
        // A refused update voids the handle's step, as on the GPU.
        Self.expectWrongOrder(mentioning: "update again") { try group.dispatch(handle, slot.dispatchInputs, into: slot.dispatchOutputs) }

        try group.update(handle, topkIdx: slot.routingArguments)
        #expect(throws: wrongCount("inputs.count", 5)) {
            try group.dispatch(handle, slot.dispatchInputs + [slot.dispatchInputs[0]], into: slot.dispatchOutputs)
        }
        #expect(throws: wrongCount("outputs.count", 0)) { try group.dispatch(handle, slot.dispatchInputs, into: []) }
        for r in 0..<4 { expectMatch(Verify.untouched(slot, rank: r), step) }

        try group.dispatch(handle, slot.dispatchInputs, into: slot.dispatchOutputs)
        #expect(throws: wrongCount("inputs.count", 2)) {
            try group.combine(handle, Array(slot.combineInputs(.forward).prefix(2)), into: slot.combineOutputs(.forward))
        }
        #expect(throws: wrongCount("outputs.count", 1)) {
            try group.combine(handle, slot.combineInputs(.forward), into: [slot.combineOutputs(.forward)[0]])
        }
        // The step is intact: a correct combine still matches the reference.
        try group.combine(handle, slot.combineInputs(.forward), into: slot.combineOutputs(.forward))
        let ref = Reference(step)
        for r in 0..<4 { expectMatch(Verify.combined(slot, ref, rank: r, .forward), step) }
    }

    @Test("when ranks reject their call, the group throws the lowest rejecting rank's own error, not a peer's peerFailed, and the handle's step is void")
    func lowestFailingRankExplainsTheFailure() throws {
        let config = Self.scenario(.llRankMajor, seed: 61).config
        let step = Scenario(config: config, tokenCounts: [2, 2, 2, 2], routing: (0..<4).map { _ in [0, 5, 9, 1, 6, 10] })
        let slot = try StepHarness(step)
        slot.topkIdx[3][as: Int32.self, 4] = 301   // rank 3, token 1, column 1
        slot.topkIdx[1][as: Int32.self, 2] = 300   // rank 1, token 0, column 2
        let group = try HostGroup(step.config)
        let handle = try group.makeHandle()
        let error = #expect(throws: EPError.self) { try group.update(handle, topkIdx: slot.routingArguments) }
        guard case .invalidArgument(let field, let value, _)? = error else {
            Issue.record("expected rank 1's invalidArgument, got \(String(describing: error))")
            return
        }
        #expect(field == "topkIdx[0][2]" && value == "300", "\(error!)")
        Self.expectWrongOrder(mentioning: "failed") { try group.dispatch(handle, slot.dispatchInputs, into: slot.dispatchOutputs) }
    }

    @Test("a handle made by another group is refused, naming the handle")
    func foreignHandleIsRefused() throws {
        let step = Self.scenario(.llExpertMajor, seed: 71)
        let group = try HostGroup(step.config), other = try HostGroup(step.config)
        let slot = try StepHarness(step)
        let foreign = try other.makeHandle()
        let error = #expect(throws: EPError.self) { try group.update(foreign, topkIdx: slot.routingArguments) }
        guard case .invalidArgument(let field, _, _)? = error else {
            Issue.record("expected invalidArgument, got \(String(describing: error))")
            return
        }
        #expect(field == "handle")
        #expect(group.localRanks == [0, 1, 2, 3])
        try group.checkStatus()
    }

    @Test("send-only calls run whole on the host; complete() closes one, fails without one, and no data call may come before it",
          arguments: LayoutKind.allCases)
    func sendOnlyThenComplete(kind: LayoutKind) throws {
        let step = Self.scenario(kind, seed: 81)
        let group = try HostGroup(step.config)
        let slot = try StepHarness(step)
        let handle = try group.makeHandle()
        let sendOnly = CallOptions(phase: .sendOnly)
        Self.expectWrongOrder(mentioning: "sendOnly") { try group.complete(options: .init()) }

        try group.update(handle, topkIdx: slot.routingArguments, options: sendOnly)   // update has no halves
        try group.dispatch(handle, slot.dispatchInputs, into: slot.dispatchOutputs, options: sendOnly)
        let ref = Reference(step)
        for r in 0..<4 { expectMatch(Verify.receivedRows(slot, ref, rank: r), step) }   // already whole
        Self.expectWrongOrder(mentioning: "pending send-only dispatch") {
            try group.combine(handle, slot.combineInputs(.forward), into: slot.combineOutputs(.forward))
        }
        try group.complete(options: .init())
        Self.expectWrongOrder(mentioning: "sendOnly") { try group.complete(options: .init()) }

        slot.runExperts(try Self.layoutInfos(group, handle))
        try group.combine(handle, slot.combineInputs(.forward), into: slot.combineOutputs(.forward), options: sendOnly)
        try group.complete(options: .init())
        for r in 0..<4 { expectMatch(Verify.combined(slot, ref, rank: r, .forward), step) }
    }
}

// MARK: Helpers

extension StepHarness {
    /// The per-rank arrays a `StepGroup` call takes, built from this harness's tensors.
    var routingArguments: [TensorRef] { topkIdx.map(\.ref) }
    var dispatchInputs: [DispatchInput] { (0..<config.ranks).map { dispatchInput($0) } }
    var dispatchOutputs: [DispatchOutput] { (0..<config.ranks).map { dispatchOutput($0) } }
    func combineInputs(_ direction: PassDirection) -> [CombineInput] { (0..<config.ranks).map { combineInput($0, direction) } }
    func combineOutputs(_ direction: PassDirection) -> [CombineOutput] { (0..<config.ranks).map { combineOutput($0, direction) } }
}

extension StepHandleTests {
    /// A step of the small shape every test here uses: R = 4, E = 16 (L = 4), K = 3, H = 24,
    /// Bmax = 8, alignment 4; B per rank in 0...8 and distinct experts per token, some -1.
    static func scenario(_ kind: LayoutKind, seed: Int, type: DataType = .bf16) -> Scenario {
        var rng = SeededGenerator(seed: seed)
        let config = GroupConfig(
            algorithm: kind.algorithm, ranks: 4, experts: 16, topK: 3, hidden: 24, elementType: type,
            maxTokensPerRank: 8, layout: kind.layout(alignment: 4))
        let counts = (0..<4).map { _ in rng.chance(0.1) ? 0 : rng.int(1...8) }
        let routing = counts.map { b in
            (0..<b).flatMap { _ in
                var row = Array(0..<16).shuffled(using: &rng).prefix(3).map { Int32($0) }
                if rng.chance(0.2) { row[rng.int(0...2)] = -1 }
                return row
            }
        }
        return Scenario(config: config, tokenCounts: counts, routing: routing, dataSeed: seed)
    }

    /// Every active rank's layout info for `handle`, keyed by rank.
    static func layoutInfos(_ group: HostGroup, _ handle: HostGroupHandle) throws -> [Int: LayoutInfo] {
        var infos: [Int: LayoutInfo] = [:]
        for r in try group.activeRanks.ranks { infos[r] = try group.layoutInfo(handle, rank: r) }
        return infos
    }

    /// Every output tensor of `rank` in `slot` that differs from the same tensor of `alone`.
    static func differences(_ slot: StepHarness, _ alone: StepHarness, rank: Int) -> [String] {
        zip(slot.outputTensors(of: rank), alone.outputTensors(of: rank)).compactMap { mine, theirs in
            mine.1.bytes() == theirs.1.bytes() ? nil : "rank \(rank) \(mine.0) differs from the step run alone"
        }
    }

    /// The step alone on a fresh group through the per-rank API, with identity experts in every
    /// layout (the expert outputs are the received rows).
    static func aloneWithIdentityExperts(_ scenario: Scenario) throws -> (StepHarness, [Int: LayoutInfo]) {
        let h = try StepHarness(scenario)
        for (_, result) in h.update() { try result.get() }
        let infos = try h.dispatch().mapValues { try $0.get() }
        for r in 0..<scenario.ranks where h.expertOutputs[r] !== h.received[r] {
            h.expertOutputs[r].storage.copyMemory(from: h.received[r].storage, byteCount: h.received[r].byteCount)
        }
        for (_, result) in h.combine() { try result.get() }
        return (h, infos)
    }

    /// The reference forward combine of rank s with identity experts: weighted sum of the token's
    /// selections (expert-major layouts, the reference's own definition), or the token itself once
    /// per destination rank that received it (rank-major, flat), in float32, rounded once.
    static func identityCombined(_ ref: Reference, _ s: Int) -> [UInt8] {
        switch ref.config.layout {
        case .expertMajor, .expertMajorPadded: return ref.combined(s, .forward)
        case .rankMajor, .flat: break
        }
        var out: [UInt8] = []
        for t in 0..<ref.scenario.tokenCounts[s] {
            let x = ref.tokenValues(s, t)
            var acc = Array(repeating: Float(0), count: ref.hidden)
            for d in ref.destinations(s, t) where ref.receive(on: d).pairRow[Reference.Pair(source: s, token: t)] != nil {
                for i in 0..<ref.hidden { acc[i] = acc[i].addingProduct(1, x[i]) }
            }
            out += ReferenceArithmetic.encodeRow(acc, as: ref.config.elementType)
        }
        return out
    }

    static func expectWrongOrder(
        mentioning phrase: String, sourceLocation: SourceLocation = #_sourceLocation, _ call: () throws -> Void
    ) {
        let error = #expect(throws: EPError.self, sourceLocation: sourceLocation) { try call() }
        guard case .wrongOrder(let message)? = error else {
            Issue.record("expected wrongOrder, got \(String(describing: error))", sourceLocation: sourceLocation)
            return
        }
        #expect(message.contains(phrase), "\(message)", sourceLocation: sourceLocation)
    }
}

/// One set of dispatch outputs shared by every layer (a model's single receive buffer), filled
/// with the poison byte once, never cleared between layers.
final class BufferSlot {
    let config: GroupConfig
    let received: [HostTensor]
    let receivedIdx: [HostTensor?]
    let receivedWeights: [HostTensor?]

    init(_ config: GroupConfig) throws {
        self.config = config
        received = try (0..<config.ranks).map { _ in try HostTensor(config.elementType, config.receiveShape) }
        receivedIdx = try (0..<config.ranks).map { _ in try config.receiveRoutingShape.map { try HostTensor(.i32, $0) } }
        receivedWeights = try (0..<config.ranks).map { _ in try config.receiveRoutingShape.map { try HostTensor(.f32, $0) } }
        for t in received { t.fill(byte: StepHarness.poison) }
        for t in receivedIdx + receivedWeights { t?.fill(byte: StepHarness.poison) }
    }

    var dispatchOutputs: [DispatchOutput] {
        (0..<config.ranks).map { DispatchOutput(tokens: received[$0].ref, topkIdx: receivedIdx[$0]?.ref, topkWeights: receivedWeights[$0]?.ref) }
    }

    /// Combine inputs with identity experts: the expert outputs are the received rows.
    func identityCombineInputs(_ layer: StepHarness) -> [CombineInput] {
        (0..<config.ranks).map { r in
            switch config.layout {
            case .expertMajor: CombineInput(expertOutputs: received[r].ref, topkWeights: layer.weights[r].ref)
            case .rankMajor, .flat: CombineInput(expertOutputs: received[r].ref)
            case .expertMajorPadded: CombineInput(expertOutputs: received[r].ref, topkWeights: receivedWeights[r]?.ref)
            }
        }
    }

    /// Rows and routing entries of rank d's received zones (per the reference) that differ from
    /// the step run alone; rows outside them may hold an earlier layer's data.
    func receivedZoneDifferences(_ alone: StepHarness, _ ref: Reference, rank d: Int) -> [String] {
        let expected = ref.receive(on: d), rowBytes = config.rowBytes
        var problems: [String] = []
        for (row, content) in expected.rows.enumerated() where content != .untouched {
            if memcmp(received[d].storage + row * rowBytes, alone.received[d].storage + row * rowBytes, rowBytes) != 0 {
                problems.append("rank \(d) row \(row) (\(content)) differs from the step alone")
            }
        }
        if let idx = receivedIdx[d], let weights = receivedWeights[d],
           let aloneIdx = alone.receivedIdx[d], let aloneWeights = alone.receivedWeights[d] {
            let perRow = idx.elementCount / max(1, expected.rows.count)
            for row in expected.index.keys.sorted() {
                for c in 0..<perRow {
                    let i = row * perRow + c
                    let local = Int(idx[as: Int32.self, i])
                    let aloneLocal = aloneIdx.dtype == .i32 ? Int(aloneIdx[as: Int32.self, i]) : Int(aloneIdx[as: Int64.self, i])
                    if local != aloneLocal || weights[as: Float.self, i].bitPattern != aloneWeights[as: Float.self, i].bitPattern {
                        problems.append("rank \(d) routing row \(row) column \(c) differs from the step alone")
                    }
                }
            }
        }
        return problems
    }
}
