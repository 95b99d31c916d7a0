import CExpertParallel
import ExpertParallel
@testable import ExpertParallelC
import ExpertParallelGPU
import Foundation
import Testing

/// Every backend accepts and refuses the same calls with the same status and field (the host
/// group the oracle): an argument the call has no use for is refused, not ignored
/// (`InapplicableArgument.cases`, CallShapes's checks); a data call while a send-only call waits
/// for its complete is refused (epInvalidUsage) on the collective calls and a host rank's own.
enum ArgumentParity {
    typealias Outcome = InapplicableArgument.Outcome

    /// The case on `fixture`'s group: the collective call, then the stacked one, each refused
    /// with the argument named, and accepted without it.
    static func expectRefused(_ c: InapplicableArgument, _ make: () throws -> ArgumentParityFixture) throws {
        let collective = try make().collective(c)
        #expect(c.isRefusal(collective.refused, field: c.argument.collectiveField), "\(c.name), collective: \(collective.refused)")
        #expect(collective.retried.status == epSuccess, "\(c.name), collective without the argument: \(collective.retried)")
        let stacked = try make().stacked(c)
        #expect(c.isRefusal(stacked.refused, field: c.argument.stackedField), "\(c.name), stacked: \(stacked.refused)")
        #expect(stacked.retried.status == epSuccess, "\(c.name), stacked without the argument: \(stacked.retried)")
    }

    /// Runs `body(rank)` for every rank of `ranks` on a thread of its own (a host rank's per-rank
    /// calls wait for the others'); each rank's outcomes in order.
    static func onRanks(_ ranks: Int, _ body: @escaping @Sendable (Int) -> [Outcome]) -> [[Outcome]] {
        final class Results: @unchecked Sendable {   // each thread writes its own rank's entry, under the lock
            let lock = NSLock(), done = DispatchGroup()
            var outcomes: [Int: [Outcome]] = [:]
        }
        let results = Results()
        for r in 0..<ranks {
            results.done.enter()
            Thread {
                let outcome = body(r)
                results.lock.withLock { results.outcomes[r] = outcome }
                results.done.leave()
            }.start()
        }
        results.done.wait()
        return (0..<ranks).map { results.outcomes[$0]! }
    }

    /// An `@unchecked Sendable` box for what the rank threads share (the fixture's structs, which
    /// hold pointers; every thread reads only its own rank's).
    final class Shared<T>: @unchecked Sendable {
        let value: T
        init(_ value: T) { self.value = value }
    }

    /// Each rank's handle of `group` (destroyed with the returned closure).
    static func handles(_ group: epGroup_t, ranks: Int) -> [epHandle_t] {
        (0..<ranks).map { r in
            var handle: epHandle_t?
            #expect(cHandleCreate(group, Int32(r), &handle) == epSuccess)
            return handle!
        }
    }
}

@Suite(.serialized)
struct HostArgumentParityTests {
    typealias Outcome = InapplicableArgument.Outcome

    /// The collective and stacked calls of a host group refuse the argument, naming it.
    @Test(arguments: InapplicableArgument.cases)
    func theHostGroupRefusesAnArgumentTheCallDoesNotTake(_ c: InapplicableArgument) throws {
        try ArgumentParity.expectRefused(c) { try ArgumentParityFixture.host(c.config) }
    }

    /// A host rank's own calls (epHandleUpdate, epDispatch, epCombine) refuse it too: every rank
    /// gives it, every rank is refused naming it; then every rank's call without it succeeds.
    @Test(arguments: InapplicableArgument.cases)
    func aHostRanksOwnCallsRefuseAnArgumentTheCallDoesNotTake(_ c: InapplicableArgument) throws {
        let fixture = try ArgumentParityFixture.host(c.config)
        let r = c.config.ranks
        let handles = ArgumentParity.handles(fixture.group, ranks: r)
        defer { for h in handles { _ = cHandleDestroy(h) } }
        // Every rank's structs, made here (the fixture is not thread-safe), bad and good.
        let updates = try (0..<r).map(fixture.updateInputs)
        let dispatches = try (0..<r).map { try fixture.dispatchArguments($0) }
        var badDispatches = dispatches, combines: [(epCombineInputs_t, epCombineOutputs_t)] = [], badCombines = combines
        var direction = PassDirection.forward
        switch c.call {
        case .dispatch:
            badDispatches = try (0..<r).map { try fixture.dispatchArguments($0, giving: c.argument) }
        case .combine(let d):
            direction = d
            combines = try (0..<r).map { try fixture.combineArguments($0, d) }
            badCombines = try (0..<r).map { try fixture.combineArguments($0, d, giving: c.argument) }
        }
        let shared = ArgumentParity.Shared((handles, updates, dispatches, badDispatches, combines, badCombines, direction, c.call))
        let outcomes = ArgumentParity.onRanks(r) { rank in
            let (handles, updates, dispatches, badDispatches, combines, badCombines, direction, call) = shared.value
            let h = handles[rank]
            var update = updates[rank]
            var outcomes = [Outcome(cHandleUpdate(h, &update, nil, nil))]
            var config = epCombineConfig_t()
            config.structSize = epCombineConfig_t.abiSize
            config.direction = direction == .forward ? epForward : epBackward
            switch call {
            case .dispatch:
                var (i, o) = badDispatches[rank]
                outcomes.append(Outcome(cDispatch(h, &i, &o, nil, nil)))
                (i, o) = dispatches[rank]
                outcomes.append(Outcome(cDispatch(h, &i, &o, nil, nil)))
            case .combine:
                var (i, o) = dispatches[rank]
                outcomes.append(Outcome(cDispatch(h, &i, &o, nil, nil)))
                var (ci, co) = badCombines[rank]
                outcomes.append(Outcome(cCombine(h, &ci, &co, &config, nil)))
                (ci, co) = combines[rank]
                outcomes.append(Outcome(cCombine(h, &ci, &co, &config, nil)))
            }
            return outcomes
        }
        for (rank, o) in outcomes.enumerated() {
            #expect(o.dropLast(2).allSatisfy { $0.status == epSuccess }, "\(c.name), rank \(rank): \(o)")
            let refused = o[o.count - 2]
            // Every rank gave the argument: each is refused for its own, or sees a peer's refusal of it.
            #expect(c.isRefusal(refused, field: c.argument.structField)
                    || refused.status == epPeerFailed && refused.message.contains("\(c.argument.structField) = given; must be NULL"),
                    "\(c.name), rank \(rank): \(refused)")
            #expect(o.last!.status == epSuccess, "\(c.name), rank \(rank) without the argument: \(o.last!)")
        }
    }

    /// A host rank's send-only dispatch or combine stays open until epComplete: the next data
    /// call (update, dispatch, combine) is refused as on every backend (epInvalidUsage, "call epComplete for
    /// the pending send-only dispatch first"), and the call after epComplete runs.
    @Test(arguments: [epPhaseSendOnly])
    func aHostRanksOpenSendOnlyCallRefusesTheNextDataCall(_ phase: epCallPhase_t) throws {
        let config = InapplicableArgument.llExpertMajor
        let fixture = try ArgumentParityFixture.host(config)
        let r = config.ranks
        let handles = ArgumentParity.handles(fixture.group, ranks: r)
        defer { for h in handles { _ = cHandleDestroy(h) } }
        let updates = try (0..<r).map(fixture.updateInputs)
        let dispatches = try (0..<r).map { try fixture.dispatchArguments($0) }
        let combines = try (0..<r).map { try fixture.combineArguments($0, .forward) }
        let shared = ArgumentParity.Shared((handles, updates, dispatches, combines))
        let outcomes = ArgumentParity.onRanks(r) { rank in
            let (handles, updates, dispatches, combines) = shared.value
            let h = handles[rank]
            var update = updates[rank]
            var (i, o) = dispatches[rank]
            var (ci, co) = combines[rank]
            var sendOnly = epDispatchConfig_t()
            sendOnly.structSize = epDispatchConfig_t.abiSize
            sendOnly.phase = phase
            var combineSendOnly = epCombineConfig_t()
            combineSendOnly.structSize = epCombineConfig_t.abiSize
            combineSendOnly.phase = phase
            return [
                Outcome(cHandleUpdate(h, &update, nil, nil)),
                Outcome(cDispatch(h, &i, &o, &sendOnly, nil)),   // 1: open
                Outcome(cDispatch(h, &i, &o, nil, nil)),   // 2: refused
                Outcome(cCombine(h, &ci, &co, nil, nil)),   // 3: refused
                Outcome(cComplete(h, nil)),   // 4
                Outcome(cComplete(h, nil)),   // 5: nothing open
                Outcome(cCombine(h, &ci, &co, &combineSendOnly, nil)),   // 6: open
                Outcome(cDispatch(h, &i, &o, nil, nil)),   // 7: refused
                Outcome(cHandleUpdate(h, &update, nil, nil)),   // 8: refused (and, as any refused update of a host rank, voids its step)
                Outcome(cComplete(h, nil)),   // 9
                Outcome(cHandleUpdate(h, &update, nil, nil)),   // 10
                Outcome(cDispatch(h, &i, &o, nil, nil)),   // 11
            ]
        }
        for (rank, o) in outcomes.enumerated() {
            for i in [0, 1, 4, 6, 9, 10, 11] { #expect(o[i].status == epSuccess, "rank \(rank), call \(i): \(o[i])") }
            for i in [2, 3] {
                #expect(o[i].status == epInvalidUsage && o[i].message.contains("call epComplete for the pending send-only dispatch first"), "rank \(rank), call \(i): \(o[i])")
            }
            for i in [7, 8] {
                #expect(o[i].status == epInvalidUsage && o[i].message.contains("call epComplete for the pending send-only combine first"), "rank \(rank), call \(i): \(o[i])")
            }
            #expect(o[5].status == epInvalidUsage && o[5].message.contains("needs a dispatch or combine issued with phase epPhaseSendOnly"), "rank \(rank): \(o[5])")
        }
    }

    /// The collective calls of a host group refuse them the same way (the oracle of the above).
    @Test func aHostGroupsOpenSendOnlyCallRefusesTheNextDataCall() throws {
        try ArgumentParity.expectSendOnlyRefusals(try ArgumentParityFixture.host(InapplicableArgument.llExpertMajor))
    }
}

extension ArgumentParity {
    /// A collective send-only dispatch, then a dispatch, a combine, an update and a stacked
    /// dispatch before epGroupComplete: each refused with epInvalidUsage naming the open call.
    static func expectSendOnlyRefusals(_ fixture: ArgumentParityFixture) throws {
        #expect(try fixture.updateAll().status == epSuccess)
        #expect(try fixture.dispatchAll(phase: epPhaseSendOnly).status == epSuccess)
        var stacked = try fixture.stackedDispatch()
        stacked.receivedTopkIdx = epStacked_t()
        stacked.receivedTopkWeights = epStacked_t()
        for (name, outcome) in [("dispatch", try fixture.dispatchAll()), ("combine", try fixture.combineAll(.forward)), ("update", try fixture.updateAll()),
                                ("stacked dispatch", Outcome(cGroupDispatchStacked(fixture.group, &stacked, nil)))] {
            #expect(outcome.status == epInvalidUsage && outcome.message.contains("call epGroupComplete for the pending send-only dispatch first"), "\(name): \(outcome)")
        }
        // Nor may the mask change under the receiving half.
        for (name, outcome) in [("clean", Outcome(cGroupCleanRanks(fixture.group, ~0))), ("deactivate", Outcome(cGroupDeactivateRank(fixture.group, 1)))] {
            #expect(outcome.status == epInvalidUsage && outcome.message.contains("call epGroupComplete for the pending send-only dispatch first"), "\(name): \(outcome)")
        }
        var mask: UInt64 = 0
        #expect(cGroupGetActiveRanks(fixture.group, &mask) == epSuccess && mask == 0b11, "every rank still active")
        #expect(Outcome(cGroupComplete(fixture.group, nil)).status == epSuccess)
        // The refused update (and stacked dispatch with routing) left the step as it was: the
        // stacked combine takes it as the collective one does.
        var combine = try fixture.stackedCombine(.forward)
        #expect(Outcome(cGroupCombineStacked(fixture.group, &combine, nil)).status == epSuccess)
        #expect(try fixture.combineAll(.forward).status == epSuccess)
    }
}

/// The virtual GPU group refuses what the host group refuses, with the same status and field
/// (over the mock driver: the checks run before anything is launched, so no GPU is needed).
@Suite(.serialized)
struct VirtualGPUArgumentParityTests {
    @Test(arguments: InapplicableArgument.cases)
    func theVirtualGPUGroupRefusesAnArgumentTheCallDoesNotTake(_ c: InapplicableArgument) throws {
        try MockCUDA.run { _ in
            let device = try MockCUDA.device()
            try ArgumentParity.expectRefused(c) { try ArgumentParityFixture.virtualGPU(c.config, device: device) }
        }
    }

    @Test func aVirtualGPUGroupsOpenSendOnlyCallRefusesTheNextDataCall() throws {
        try MockCUDA.run { _ in
            try ArgumentParity.expectSendOnlyRefusals(try ArgumentParityFixture.virtualGPU(InapplicableArgument.llExpertMajor, device: try MockCUDA.device()))
        }
    }
}

/// The same on a GPU (EP_GPU_TESTS=1): the checks, and the calls they let through, on the device.
@Suite(.enabled(if: gpuTestsEnabled && sharedDevice != nil, "needs a GPU (EP_GPU_TESTS=1)"), .serialized)
struct GPUArgumentParityTests {
    @Test(arguments: InapplicableArgument.cases)
    func theVirtualGPUGroupRefusesAnArgumentTheCallDoesNotTake(_ c: InapplicableArgument) throws {
        let device = try #require(sharedDevice)
        try ArgumentParity.expectRefused(c) { try ArgumentParityFixture.virtualGPU(c.config, device: device) }
    }

    @Test func aVirtualGPUGroupsOpenSendOnlyCallRefusesTheNextDataCall() throws {
        try ArgumentParity.expectSendOnlyRefusals(try ArgumentParityFixture.virtualGPU(InapplicableArgument.llExpertMajor, device: try #require(sharedDevice)))
    }
}

/// An NCCL rank refuses what the host group refuses: its calls with the caller's own tensors (the
/// C ABI's epDispatch / epCombine with tensors that are not a slot's own: the group receives into
/// its own buffers, then copies) check the caller's arguments with the same checks (over the mock
/// driver and MockNCCLWorld, one rank). The field is the Swift call's (`output.topkIdx`), which
/// epDispatch names `outputs.topkIdx`.
@Suite(.serialized)
struct NCCLRankArgumentParityTests {
    @Test(arguments: InapplicableArgument.cases)
    func anNCCLRankRefusesAnArgumentTheCallDoesNotTake(_ c: InapplicableArgument) throws {
        var config = c.config
        config.ranks = 1
        let field = c.argument.structField.replacing("outputs.", with: "output.").replacing("inputs.", with: "input.")
        try MockCUDA.run { _ in
            let device = try MockCUDA.device()
            let group = try NCCLStackedCallMockTests.groups(config, device: device)[0]
            let a = try StackedCallMockTests.Arrays(config, tokens: 2, device: device)
            let handle = try group.makeHandle()
            defer { handle.release() }
            try group.update(handle, topkIdx: [a.part("idx", 0)!])
            let extra = a.part("w", 0)!   // any tensor: given is what is refused
            var input = a.dispatchInput(0), output = a.dispatchOutput(0)
            if config.fp8?.source != .passThrough { input.scales = nil }   // (the arrays have scales for every FP8 group)
            let goodInput = input, goodOutput = output
            func refused(_ body: () throws -> Void) {
                #expect {
                    try body()
                } throws: { error in
                    guard case let .invalidArgument(name, value, requirement)? = error as? EPError else { return false }
                    return name == field && value == "given" && requirement.hasPrefix("must be nil")
                }
            }
            switch c.call {
            case .dispatch:
                switch c.argument {
                case .receivedTopkIdx: output.topkIdx = extra
                case .receivedTopkWeights: output.topkWeights = extra
                case .receivedScales: output.scales = extra
                case .inputScales: input.scales = extra
                default: Issue.record("not a dispatch argument: \(c.argument)")
                }
                refused { try group.dispatch(input, copyingInto: output, handle: handle) }
                try group.dispatch(goodInput, copyingInto: goodOutput, handle: handle)   // without it
            case .combine(let direction):
                try group.dispatch(input, copyingInto: output, handle: handle)
                let gradients = direction == .backward && config.algorithm == .highThroughput
                let weighs = direction == .forward && (config.layout == .expertMajor || config.isExpertMajorHT)
                let weights = config.isExpertMajorHT ? a.part("recvW", 0) : a.part("w", 0)
                let good = CombineInput(expertOutputs: a.part("y", 0)!, topkWeights: weighs ? weights : nil,
                                        weightGradients: gradients ? a.part("gradIn", 0) : nil)
                let combined = CombineOutput(tokens: a.part("out", 0)!, topkWeightGradients: gradients ? a.part("gradOut", 0) : nil)
                var bad = good, badOutput = combined
                switch c.argument {
                case .combineWeights: bad.topkWeights = extra
                case .weightGradients: bad.weightGradients = extra
                case .topkWeightGradients: badOutput.topkWeightGradients = a.part("gradOut", 0)
                default: Issue.record("not a combine argument: \(c.argument)")
                }
                refused { try group.combine(copyingFrom: bad, into: badOutput, handle: handle, direction: direction) }
                try group.combine(copyingFrom: good, into: combined, handle: handle, direction: direction)   // without it
            }
        }
    }
}
