import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// An NCCL rank's stacked calls (one part: this rank's) launch what its per-rank calls launch
/// for the same tensors: the same kernels with the same argument blocks, byte for byte, in
/// every layout (an NCCL group of one rank over the mock driver and NCCL tables, so CI checks
/// it without a GPU); and they refuse receive buffers that are not a slot's own, launching nothing.
@Suite(.serialized)
struct NCCLStackedCallMockTests {
    typealias Arrays = StackedCallMockTests.Arrays

    /// The per-rank cases of `StackedCallMockTests` at one rank.
    static let cases: [(String, GroupConfig)] = StackedCallMockTests.cases.map { name, config in
        var config = config
        config.ranks = 1
        return (name, config)
    }

    static func group(_ config: GroupConfig, device: GPUDevice, tuning: GPUTuning = GPUTuning()) throws -> NCCLRankGroup {
        try NCCLRankGroup(config, device: device, comm: NCCLComm(rawValue: OpaquePointer(bitPattern: 0xCC_0000)!), nccl: try MockCUDA.nccl(peerPointers: true),
                          tuning: tuning)
    }

    /// A stacked dispatch of `a`'s inputs into slot `slot`'s own buffers.
    static func dispatch(_ a: Arrays, _ group: NCCLRankGroup, slot: Int, tokens: Int, routing: Bool) -> StackedDispatch {
        let buffers = group.slots[slot]
        var call = a.stackedDispatch(tokens: tokens, routing: routing)
        call.received = StackedTensor(buffers.receivedTokens)
        call.receivedTopkIdx = buffers.receivedIndices.map(StackedTensor.init)
        call.receivedTopkWeights = buffers.receivedWeights.map(StackedTensor.init)
        call.receivedScales = buffers.receivedScales.map(StackedTensor.init)
        return call
    }

    static func stacked(_ t: TensorRef?) -> StackedTensor? { t.map(StackedTensor.init) }

    /// The same launches with the same argument blocks; where not, the 8-byte words that differ.
    static func expectSame(_ stacked: [[UInt8]], _ perRank: [[UInt8]], _ name: String) {
        #expect(stacked.count == perRank.count, "\(name): \(stacked.count) launches against \(perRank.count)")
        for (i, (expected, got)) in zip(perRank, stacked).enumerated() {
            let words = stride(from: 0, to: expected.count, by: 8).filter { expected[$0..<$0 + 8] != got[$0..<$0 + 8] }.map { $0 / 8 }
            #expect(words.isEmpty, "\(name): launch \(i)'s argument block differs at words \(words)")
        }
    }

    /// Runs `body` over the mock with a group of `config`, arrays of `tokens` rows, a handle and
    /// launch argument blocks captured.
    static func step(
        _ config: GroupConfig, tokens: Int, tuning: GPUTuning = GPUTuning(),
        _ body: (MockCUDA.State, GPUDevice, NCCLRankGroup, Arrays, GPUStepHandle) throws -> Void
    ) throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let group = try Self.group(config, device: device, tuning: tuning)
            mock.captureParameterBytes = StepArguments.rankBytes + LaunchField.allCases.count * 8
            let a = try Arrays(config, tokens: tokens, device: device)
            let handle = try group.makeHandle()
            defer { handle.release() }
            try body(mock, device, group, a, handle)
        }
    }

    /// With the update in its own launch (`fusesUpdate` off), the stacked calls' launches are the
    /// per-rank calls', byte for byte.
    @Test(arguments: cases.indices)
    func stackedCallsLaunchWhatPerRankCallsLaunch(_ index: Int) throws {
        let (name, config) = Self.cases[index]
        let b = config.maxTokensPerRank - 1
        try Self.step(config, tokens: b, tuning: GPUTuning(fusesUpdate: false)) { mock, device, group, a, handle in
            #expect(!group.fusesUpdate)
            let slot = 1, buffers = group.slots[slot]
            let ht = config.algorithm == .highThroughput
            // The weights combine applies: the source's (LL expert-major) or the slot's per-slot ones (HT padded).
            let weights: TensorRef? = config.layout == .expertMajor ? a.part("w", 0) : config.isExpertMajorHT ? buffers.receivedWeights : nil
            var counts = a.dispatchOutput(0)
            counts.tokens = buffers.receivedTokens
            let perRank = try StackedCallMockTests.launched(mock) {
                try group.update(handle, topkIdx: [a.part("idx", 0)!])
                try group.dispatch(handle, [a.dispatchInput(0)], slot: slot, counts: counts)
                try group.combine(handle, [CombineInput(expertOutputs: buffers.expertOutputs, topkWeights: weights)],
                                  into: [CombineOutput(tokens: a.part("out", 0)!)])
                try group.dispatch(handle, [a.dispatchInput(0)], slot: slot, counts: counts)
                if ht {
                    try group.combine(handle, [CombineInput(expertOutputs: buffers.expertOutputs, weightGradients: buffers.weightGradients)],
                                      into: [CombineOutput(tokens: a.part("out", 0)!, topkWeightGradients: a.part("gradOut", 0))], direction: .backward)
                }
            }
            let stacked = try StackedCallMockTests.launched(mock) {
                try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: slot, tokens: b, routing: true))
                try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.stacked(buffers.expertOutputs)!, topkWeights: Self.stacked(weights),
                                                                  combined: a.stacked["out"]!))
                try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: slot, tokens: b, routing: false), direction: .backward)
                if ht {
                    try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.stacked(buffers.expertOutputs)!,
                                                                      weightGradients: Self.stacked(buffers.weightGradients),
                                                                      combined: a.stacked["out"]!, topkWeightGradients: a.stacked["gradOut"]),
                                      direction: .backward)
                }
            }
            // The update and the dispatch are two launches with the fused kernel turned off.
            #expect(perRank.count == (ht ? 5 : 4), "\(name)")
            Self.expectSame(stacked, perRank, name)
            #expect(handle.bufferSlot == slot)
        }
    }

    /// By default an LL stacked dispatch with routing is one launch of the fused kernel, whose
    /// argument block is the per-rank dispatch's; HT keeps the update's launch and the dispatch's.
    @Test(arguments: cases.indices)
    func anLLUpdateAndDispatchIsOneLaunchWithTheDispatchsArguments(_ index: Int) throws {
        let (name, config) = Self.cases[index]
        let b = config.maxTokensPerRank - 1
        try Self.step(config, tokens: b) { mock, _, group, a, handle in
            let ll = config.algorithm == .lowLatency
            #expect(group.fusesUpdate == ll, "\(name)")
            var counts = a.dispatchOutput(0)
            counts.tokens = group.slots[0].receivedTokens
            let perRank = try StackedCallMockTests.launched(mock) {
                try group.update(handle, topkIdx: [a.part("idx", 0)!])
                try group.dispatch(handle, [a.dispatchInput(0)], slot: 0, counts: counts)
            }
            let first = mock.launchedKernels.count
            let stacked = try StackedCallMockTests.launched(mock) {
                try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: 0, tokens: b, routing: true))
            }
            let kernels = Array(mock.launchedKernels[first...])
            #expect(perRank.count == 2, "\(name)")
            if ll {
                #expect(kernels == ["ep_ll_update_dispatch"], "\(name)")
                Self.expectSame(stacked, [perRank[1]], name)
            } else {
                #expect(kernels == ["ep_ht_update", "ep_ht_dispatch"], "\(name)")
                Self.expectSame(stacked, perRank, name)
            }
            // The step is the handle's: its combine runs.
            let before = mock.launches
            let weights = config.layout == .expertMajor ? a.stacked["w"] : config.isExpertMajorHT ? Self.stacked(group.slots[0].receivedWeights) : nil
            try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.stacked(group.slots[0].expertOutputs)!, topkWeights: weights,
                                                              combined: a.stacked["out"]!))
            #expect(mock.launches == before + 1, "\(name)")
        }
    }

    /// Whether a stacked dispatch fuses the update: automatic (nil) fuses for virtual ranks and
    /// an NCCL rank with no peers, not at an NCCL rank with peers (whose dispatch blocks would
    /// wait on every SM for the slowest peer's counts); an explicit choice wins; HT, the staged
    /// transport and per-rank launches never fuse.
    @Test func theUpdateFusesAutomaticallyWhereNoPeerIsInAnotherProcess() throws {
        try MockCUDA.run { _ in
            let device = try MockCUDA.device()
            func fuses(_ config: GroupConfig, _ placement: StepEngine.Placement, _ choice: Bool?, transport: GPUTransport = .direct,
                       launch: LaunchMode = .single) throws -> Bool {
                let config = try config.validatedForGPU()
                let engine = StepEngine(config: config, device: device, tuning: GPUTuning(fusesUpdate: choice), placement: placement,
                                        workspaces: [], mask: DevicePointer(rawValue: 0), stream: try device.driver.createStream(),
                                        multiprocessors: 4, transport: transport)
                return engine.canFuseUpdate(CallOptions(nil, mode: launch))
            }
            let virtual = StepEngine.Placement.virtualRanks(rankStreams: [], joinEvents: [])
            for ranks in [1, 2, 8] {
                let ll = GroupConfig(algorithm: .lowLatency, ranks: ranks, experts: 8 * ranks, topK: 4, hidden: 128, maxTokensPerRank: 8)
                #expect(try fuses(ll, virtual, nil), "virtual R = \(ranks)")
                #expect(try fuses(ll, .process(rank: 0), nil) == (ranks == 1), "NCCL rank, R = \(ranks)")
                #expect(try fuses(ll, .process(rank: 0), true), "NCCL rank, R = \(ranks), on")
                #expect(try !fuses(ll, .process(rank: 0), false) && !fuses(ll, virtual, false), "R = \(ranks), off")
                #expect(try !fuses(ll, virtual, true, transport: .staged), "staged, R = \(ranks)")
                #expect(try !fuses(ll, virtual, true, launch: .perRank), "per-rank launches, R = \(ranks)")
                let ht = GroupConfig(algorithm: .highThroughput, ranks: ranks, experts: 8 * ranks, topK: 4, hidden: 128, maxTokensPerRank: 8)
                #expect(try !fuses(ht, virtual, true) && !fuses(ht, .process(rank: 0), true), "HT, R = \(ranks)")
            }
        }
    }

    /// A combine from a tensor of the caller's copies the step's received rows into the slot's
    /// buffer first, as `combine(copyingFrom:)` does; the same launches.
    @Test(arguments: [0, 2])
    func aStackedCombineFromTheCallersTensorCopiesAsThePerRankOneDoes(_ index: Int) throws {
        let (name, config) = Self.cases[index]
        let b = config.maxTokensPerRank - 1
        try Self.step(config, tokens: b) { mock, device, group, a, handle in
            try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: 0, tokens: b, routing: true))
            let weights = config.layout == .expertMajor ? a.part("w", 0) : nil
            let first = mock.launchedKernels.count
            let perRank = try StackedCallMockTests.launched(mock) {
                try group.combine(copyingFrom: CombineInput(expertOutputs: a.part("y", 0)!, topkWeights: weights), into: CombineOutput(tokens: a.part("out", 0)!),
                                  handle: handle)
            }
            let kernels = Array(mock.launchedKernels[first...])
            let stacked = try StackedCallMockTests.launched(mock) {
                try group.combine(handle, stacked: StackedCombine(expertOutputs: a.stacked["y"]!, topkWeights: Self.stacked(weights),
                                                                  combined: a.stacked["out"]!))
            }
            #expect(kernels.count == 2 && kernels[0].hasSuffix("_copy_received"), "\(name): \(kernels)")
            Self.expectSame(stacked, perRank, name)
            // At a 2-byte offset: refused by no stride check, copied whole (no copy kernel), as per rank.
            let room = try DeviceTensor(.u8, [config.receiveShape.reduce(1, *) * config.elementType.byteSize + 8], on: device)
            let odd = TensorRef(address: room.ref.address.map { $0 + 2 }, dtype: config.elementType, shape: config.receiveShape, location: .device(0))
            let oddStacked = Self.stacked(odd)!
            let launches = mock.launches
            try group.combine(copyingFrom: CombineInput(expertOutputs: odd, topkWeights: weights), into: CombineOutput(tokens: a.part("out", 0)!),
                              handle: handle)
            try group.combine(handle, stacked: StackedCombine(expertOutputs: oddStacked, topkWeights: Self.stacked(weights), combined: a.stacked["out"]!))
            #expect(mock.launches == launches + 2, "\(name): one combine launch each, the copies whole")
        }
    }

    /// A rank with no tokens updates and dispatches (its peers wait for its counts), and
    /// combines; received ids, weights and scales not given are the slot's own, as for epDispatch.
    @Test(arguments: [0, 2, 4])
    func aRankWithNoTokensStepsAndReceivedBuffersDefaultToTheSlots(_ index: Int) throws {
        let (name, config) = Self.cases[index]
        try Self.step(config, tokens: 0) { mock, _, group, a, handle in
            let first = mock.launchedKernels.count
            try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: 0, tokens: 0, routing: true))
            // The update and the dispatch: one launch (LL's fused kernel) or two (HT).
            #expect(mock.launchedKernels.count == first + (config.algorithm == .lowLatency ? 1 : 2), "\(name)")
            try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.stacked(group.slots[0].expertOutputs)!,
                                                              topkWeights: config.layout == .expertMajor ? a.stacked["w"] : nil,
                                                              combined: a.stacked["out"]!))
            #expect(mock.launchedKernels.count == first + (config.algorithm == .lowLatency ? 2 : 3), "\(name)")
            var bare = Self.dispatch(a, group, slot: 1, tokens: 0, routing: true)
            bare.receivedTopkIdx = nil
            bare.receivedTopkWeights = nil
            bare.receivedScales = nil
            let given = try StackedCallMockTests.launched(mock) { try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: 1, tokens: 0, routing: true)) }
            let defaulted = try StackedCallMockTests.launched(mock) { try group.dispatch(handle, stacked: bare) }
            Self.expectSame(defaulted, given, name)
        }
    }

    /// Receive buffers that are not the slot's own are named, and nothing is launched; nor is
    /// the step changed: its combine still runs.
    @Test func buffersNotTheSlotsOwnAreRefusedByName() throws {
        let config = Self.cases[2].1   // HT flat: received ids and weights
        let b = 2
        try Self.step(config, tokens: b) { mock, _, group, a, handle in
            let good = Self.dispatch(a, group, slot: 0, tokens: b, routing: true)
            try group.dispatch(handle, stacked: good)
            func refused(_ change: (inout StackedDispatch) -> Void, _ field: String, _ words: String) {
                var bad = good
                change(&bad)
                let before = mock.launches
                do {
                    try group.dispatch(handle, stacked: bad)
                    Issue.record("\(field): accepted")
                } catch {
                    #expect("\(error)".contains(field) && "\(error)".contains(words), "\(error)")
                }
                #expect(mock.launches == before, "\(field)")
            }
            refused({ $0.received = a.stacked["recv"]! }, "call.receivedTokens", "buffer slots")
            refused({ $0.receivedTopkIdx = a.stacked["recvIdx"] }, "call.receivedTopkIdx", "slot 0's own buffer")
            refused({ $0.receivedTopkWeights = a.stacked["recvW"] }, "call.receivedTopkWeights", "slot 0's own buffer")
            refused({ $0.receivedTopkIdx?.dtype = .i64 }, "call.receivedTopkIdx", "i32")
            refused({ $0.tokens = config.maxTokensPerRank + 1 }, "tokens", "maxTokensPerRank")
            let before = mock.launches
            try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.stacked(group.slots[0].expertOutputs)!, combined: a.stacked["out"]!))
            #expect(mock.launches == before + 1)
        }
    }
}
