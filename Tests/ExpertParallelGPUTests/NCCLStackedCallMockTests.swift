import CExpertParallel
import ExpertParallel
@testable import ExpertParallelC
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Foundation
import Testing

/// An NCCL rank's stacked calls (one part: this rank's) launch what its per-rank calls launch
/// for the same tensors: the same kernels with the same argument blocks, byte for byte, in
/// every layout, at every rank of a group of one and of several (over the mock driver and
/// MockNCCLWorld, every rank a thread here, so CI checks it without a GPU); each rank's launches
/// carry its peers' buffers; and the calls refuse receive buffers that are not a slot's own,
/// launching nothing.
@Suite(.serialized)
struct NCCLStackedCallMockTests {
    typealias Arrays = StackedCallMockTests.Arrays

    /// The cases of `StackedCallMockTests` at one rank, then as they are (R = 2 or 3).
    static let cases: [(String, GroupConfig)] = StackedCallMockTests.cases.map { name, config in
        var config = config
        config.ranks = 1
        return (name, config)
    } + StackedCallMockTests.cases.map { name, config in ("\(name) R = \(config.ranks)", config) }

    /// Every rank's group of `config`, each joining on a thread of its own (the join is collective).
    static func groups(_ config: GroupConfig, device: GPUDevice, tuning: GPUTuning = GPUTuning()) throws -> [NCCLRankGroup] {
        final class Joins: @unchecked Sendable {   // each thread writes its own rank's entry, under the lock
            let lock = NSLock(), done = DispatchGroup()
            var results: [Int: Result<NCCLRankGroup, EPError>] = [:]
        }
        let nccl = try MockCUDA.nccl(peerPointers: true), joins = Joins()
        for r in 0..<config.ranks {
            joins.done.enter()
            Thread {
                let comm = NCCLComm(rawValue: MockNCCLWorld.comm(rank: r, of: config.ranks, world: 1))
                let result = Result { () throws(EPError) in try NCCLRankGroup(config, device: device, comm: comm, nccl: nccl, tuning: tuning) }
                joins.lock.withLock { joins.results[r] = result }
                joins.done.leave()
            }.start()
        }
        joins.done.wait()
        return try (0..<config.ranks).map { try joins.results[$0]!.get() }
    }

    /// Rank `rank`'s part of `a`'s argument `name`, as a one-part stacked argument.
    static func part(_ a: Arrays, _ name: String, _ rank: Int) -> StackedTensor? { a.part(name, rank).map(StackedTensor.init) }

    /// A stacked dispatch of `group`'s rank's part of `a`'s inputs into slot `slot`'s own buffers.
    static func dispatch(_ a: Arrays, _ group: NCCLRankGroup, slot: Int, tokens: Int, routing: Bool) -> StackedDispatch {
        let buffers = group.slots[slot], r = group.rank
        return StackedDispatch(
            tokens: tokens, topkIdx: routing ? part(a, "idx", r) : nil, inputs: part(a, "x", r)!, topkWeights: part(a, "w", r),
            scales: part(a, "scales", r), received: StackedTensor(buffers.receivedTokens),
            receivedTopkIdx: buffers.receivedIndices.map(StackedTensor.init), receivedTopkWeights: buffers.receivedWeights.map(StackedTensor.init),
            receivedScales: buffers.receivedScales.map(StackedTensor.init), expertCounts: part(a, "counts", r),
            expertSourceCounts: part(a, "sources", r))
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

    /// Runs `body` over the mock for every rank's group of `config` in turn, with arrays of
    /// `tokens` rows a rank, a handle of that group and launch argument blocks captured.
    static func step(
        _ config: GroupConfig, tokens: Int, tuning: GPUTuning = GPUTuning(),
        _ body: (MockCUDA.State, GPUDevice, NCCLRankGroup, Arrays, GPUStepHandle) throws -> Void
    ) throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let groups = try Self.groups(config, device: device, tuning: tuning)
            mock.captureParameterBytes = StepArguments.rankBytes * config.ranks + LaunchField.allCases.count * 8
            let a = try Arrays(config, tokens: tokens, device: device)
            for group in groups {
                let handle = try group.makeHandle()
                defer { handle.release() }
                try body(mock, device, group, a, handle)
            }
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
            let weights: TensorRef? = config.layout == .expertMajor ? a.part("w", group.rank) : config.isExpertMajorHT ? buffers.receivedWeights : nil
            var counts = a.dispatchOutput(group.rank)
            counts.tokens = buffers.receivedTokens
            let perRank = try StackedCallMockTests.launched(mock) {
                try group.update(handle, topkIdx: [a.part("idx", group.rank)!])
                try group.dispatch(handle, [a.dispatchInput(group.rank)], slot: slot, counts: counts)
                try group.combine(handle, [CombineInput(expertOutputs: buffers.expertOutputs, topkWeights: weights)],
                                  into: [CombineOutput(tokens: a.part("out", group.rank)!)])
                try group.dispatch(handle, [a.dispatchInput(group.rank)], slot: slot, counts: counts)
                if ht {
                    try group.combine(handle, [CombineInput(expertOutputs: buffers.expertOutputs, weightGradients: buffers.weightGradients)],
                                      into: [CombineOutput(tokens: a.part("out", group.rank)!, topkWeightGradients: a.part("gradOut", group.rank))], direction: .backward)
                }
            }
            let stacked = try StackedCallMockTests.launched(mock) {
                try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: slot, tokens: b, routing: true))
                try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.stacked(buffers.expertOutputs)!, topkWeights: Self.stacked(weights),
                                                                  combined: Self.part(a, "out", group.rank)!))
                try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: slot, tokens: b, routing: false), direction: .backward)
                if ht {
                    try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.stacked(buffers.expertOutputs)!,
                                                                      weightGradients: Self.stacked(buffers.weightGradients),
                                                                      combined: Self.part(a, "out", group.rank)!, topkWeightGradients: Self.part(a, "gradOut", group.rank)),
                                      direction: .backward)
                }
            }
            // The update and the dispatch are two launches with the fused kernel turned off.
            #expect(perRank.count == (ht ? 5 : 4), "\(name)")
            Self.expectSame(stacked, perRank, name)
            #expect(handle.bufferSlot == slot)
        }
    }

    /// An LL stacked dispatch with routing is one launch of the fused kernel, whose argument block
    /// is the per-rank dispatch's, where the group fuses: by default at one rank, with peers when
    /// asked (`fusesUpdate: true`); else, and for HT, the update's launch and the dispatch's.
    @Test(arguments: cases.indices, [nil, true] as [Bool?])
    func anLLUpdateAndDispatchIsOneLaunchWhereTheGroupFuses(_ index: Int, _ choice: Bool?) throws {
        let (name, config) = Self.cases[index]
        let b = config.maxTokensPerRank - 1
        try Self.step(config, tokens: b, tuning: GPUTuning(fusesUpdate: choice)) { mock, _, group, a, handle in
            let fuses = config.algorithm == .lowLatency && (choice ?? (config.ranks == 1))
            let label = "\(name), rank \(group.rank), fusesUpdate \(choice.map { "\($0)" } ?? "automatic")"
            #expect(group.fusesUpdate == fuses, "\(label)")
            var counts = a.dispatchOutput(group.rank)
            counts.tokens = group.slots[0].receivedTokens
            let perRank = try StackedCallMockTests.launched(mock) {
                try group.update(handle, topkIdx: [a.part("idx", group.rank)!])
                try group.dispatch(handle, [a.dispatchInput(group.rank)], slot: 0, counts: counts)
            }
            let first = mock.launchedKernels.count
            let stacked = try StackedCallMockTests.launched(mock) {
                try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: 0, tokens: b, routing: true))
            }
            let kernels = Array(mock.launchedKernels[first...]), grids = Array(mock.launchedGrids[(first - 2)...])
            let prefix = config.algorithm == .lowLatency ? "ep_ll" : "ep_ht"
            #expect(perRank.count == 2, "\(label)")
            if fuses {
                #expect(kernels == ["ep_ll_update_dispatch"], "\(label)")
                Self.expectSame(stacked, [perRank[1]], label)
                // One rank's launch: the dispatch's blocks, and one more for the update block's empty
                // share where its dispatch blocks find their rows themselves (one rank: nothing of
                // another rank's to read); with peers they wait for its rows, and it takes a share.
                let ownRows = config.ranks == 1 && config.llOwnRowsFit
                #expect(grids[2].y == 1 && grids[2].x == grids[1].x + (ownRows ? 1 : 0), "\(label): grids \(grids)")
            } else {
                #expect(kernels == ["\(prefix)_update", "\(prefix)_dispatch"], "\(label)")
                Self.expectSame(stacked, perRank, label)
            }
            // The step is the handle's: its combine runs.
            let before = mock.launches
            let weights = config.layout == .expertMajor ? Self.part(a, "w", group.rank) : config.isExpertMajorHT ? Self.stacked(group.slots[0].receivedWeights) : nil
            try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.stacked(group.slots[0].expertOutputs)!, topkWeights: weights,
                                                              combined: Self.part(a, "out", group.rank)!))
            #expect(mock.launches == before + 1, "\(label)")
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

    /// The C tuning's `fusedUpdate`: 0 automatic (nil), 1 on, 2 off; anything else refused by name.
    @Test func theCTuningsFusedUpdateIsAutomaticOnOrOff() throws {
        func tuning(_ value: Int32) throws -> GPUTuning {
            var c = epGPUTuning_t()
            c.fusedUpdate = value
            return try GPUTuning(c, "tuning")
        }
        #expect(try tuning(0).fusesUpdate == nil && tuning(1).fusesUpdate == true && tuning(2).fusesUpdate == false)
        for bad: Int32 in [3, -1] {
            #expect { try tuning(bad) } throws: { "\($0)".contains("tuning.fusedUpdate") && "\($0)".contains("off at an NCCL rank with peers") }
        }
    }

    /// A combine from a tensor of the caller's copies the step's received rows into the slot's
    /// buffer first, as `combine(copyingFrom:)` does; the same launches.
    @Test(arguments: [0, 2, 5, 7])
    func aStackedCombineFromTheCallersTensorCopiesAsThePerRankOneDoes(_ index: Int) throws {
        let (name, config) = Self.cases[index]
        let b = config.maxTokensPerRank - 1
        try Self.step(config, tokens: b) { mock, device, group, a, handle in
            try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: 0, tokens: b, routing: true))
            let weights = config.layout == .expertMajor ? a.part("w", group.rank) : nil
            let first = mock.launchedKernels.count
            let perRank = try StackedCallMockTests.launched(mock) {
                try group.combine(copyingFrom: CombineInput(expertOutputs: a.part("y", group.rank)!, topkWeights: weights), into: CombineOutput(tokens: a.part("out", group.rank)!),
                                  handle: handle)
            }
            let kernels = Array(mock.launchedKernels[first...])
            let stacked = try StackedCallMockTests.launched(mock) {
                try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.part(a, "y", group.rank)!, topkWeights: Self.stacked(weights),
                                                                  combined: Self.part(a, "out", group.rank)!))
            }
            #expect(kernels.count == 2 && kernels[0].hasSuffix("_copy_received"), "\(name): \(kernels)")
            Self.expectSame(stacked, perRank, name)
            // At a 2-byte offset: refused by no stride check, copied whole (no copy kernel), as per rank.
            let room = try DeviceTensor(.u8, [config.receiveShape.reduce(1, *) * config.elementType.byteSize + 8], on: device)
            let odd = TensorRef(address: room.ref.address.map { $0 + 2 }, dtype: config.elementType, shape: config.receiveShape, location: .device(0))
            let oddStacked = Self.stacked(odd)!
            let launches = mock.launches
            try group.combine(copyingFrom: CombineInput(expertOutputs: odd, topkWeights: weights), into: CombineOutput(tokens: a.part("out", group.rank)!),
                              handle: handle)
            try group.combine(handle, stacked: StackedCombine(expertOutputs: oddStacked, topkWeights: Self.stacked(weights), combined: Self.part(a, "out", group.rank)!))
            #expect(mock.launches == launches + 2, "\(name): one combine launch each, the copies whole")
            // A caller's tensor of the wrong type: refused under the stacked call's name (the
            // copying combine's checks name the per-rank view), and under the C struct's.
            var wrong = Self.part(a, "y", group.rank)!
            wrong.dtype = config.elementType == .f32 ? .bf16 : .f32
            #expect(throws: EPError.self) {
                do {
                    try group.combine(handle, stacked: StackedCombine(expertOutputs: wrong, topkWeights: Self.stacked(weights),
                                                                      combined: Self.part(a, "out", group.rank)!))
                } catch {
                    #expect("\(error)".hasPrefix("invalid argument: expertOutputs.dtype = "), "\(name): \(error)")
                    #expect((error as? EPError)?.naming(CheckedStackedCombine.Field.cNames).message.hasPrefix("invalid argument: call.expertOutputs.dtype = ") == true)
                    throw error
                }
            }
            #expect(mock.launches == launches + 2, "\(name): nothing launched for the refused call")
        }
    }

    /// A rank with no tokens updates and dispatches (its peers wait for its counts), and
    /// combines; received ids, weights and scales not given are the slot's own, as for epDispatch.
    @Test(arguments: [0, 2, 4, 5, 7, 9])
    func aRankWithNoTokensStepsAndReceivedBuffersDefaultToTheSlots(_ index: Int) throws {
        let (name, config) = Self.cases[index]
        try Self.step(config, tokens: 0) { mock, _, group, a, handle in
            let first = mock.launchedKernels.count
            try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: 0, tokens: 0, routing: true))
            // The update and the dispatch: one launch where the group fuses them, else two.
            #expect(mock.launchedKernels.count == first + (group.fusesUpdate ? 1 : 2), "\(name)")
            try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.stacked(group.slots[0].expertOutputs)!,
                                                              topkWeights: config.layout == .expertMajor ? Self.part(a, "w", group.rank) : nil,
                                                              combined: Self.part(a, "out", group.rank)!))
            #expect(mock.launchedKernels.count == first + (group.fusesUpdate ? 2 : 3), "\(name)")
            var bare = Self.dispatch(a, group, slot: 1, tokens: 0, routing: true)
            bare.receivedTopkIdx = nil
            bare.receivedTopkWeights = nil
            bare.receivedScales = nil
            let given = try StackedCallMockTests.launched(mock) { try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: 1, tokens: 0, routing: true)) }
            let defaulted = try StackedCallMockTests.launched(mock) { try group.dispatch(handle, stacked: bare) }
            Self.expectSame(defaulted, given, name)
        }
    }

    /// Every rank of a group of several maps its peers' buffers where they are (MockNCCLWorld:
    /// each peer's own addresses), and its launches carry them: each peer's group words and
    /// receive buffers of the slot; of the inputs only its own (the peers' are in other
    /// processes: zero).
    @Test(arguments: cases.indices.filter { cases[$0].1.ranks > 1 })
    func everyRankLaunchesWithItsPeersBuffers(_ index: Int) throws {
        let (name, config) = Self.cases[index]
        try Self.step(config, tokens: 2) { mock, _, group, a, handle in
            let slot = 1, me = group.rank
            let blocks = try StackedCallMockTests.launched(mock) {
                try group.dispatch(handle, stacked: Self.dispatch(a, group, slot: slot, tokens: 2, routing: true))
            }
            let dispatch = try #require(blocks.last, "\(name)")
            func word(_ rank: Int, _ field: RankField) -> UInt64 {
                let at = rank * StepArguments.rankBytes + field.rawValue * 8
                return dispatch[at..<at + 8].withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
            }
            func address(_ t: TensorRef?) -> UInt64 { UInt64(UInt(bitPattern: t?.address)) }
            for p in 0..<config.ranks {
                let label = "\(name): rank \(me)'s launch, rank \(p)'s words"
                #expect(word(p, .received) == group.peers[p].received(slot).rawValue, "\(label)")
                #expect(word(p, .workspace) == group.peers[p].workspace.rawValue, "\(label)")
                #expect(word(p, .tokens) == (p == me ? address(a.part("x", me)) : 0), "\(label)")
                #expect(word(p, .topkIdx) == (p == me ? address(a.part("idx", me)) : 0), "\(label)")
            }
        }
        // Where each rank's mapping points: the peer's own buffer.
        try MockCUDA.run { _ in
            let groups = try Self.groups(config, device: try MockCUDA.device())
            for group in groups {
                for peer in groups {
                    #expect(group.peers[peer.rank].received(1).rawValue == UInt64(UInt(bitPattern: peer.slots[1].receivedTokens.address)),
                            "\(name): rank \(group.rank) maps rank \(peer.rank)'s slot 1")
                    #expect(group.peers[peer.rank].workspace == peer.peers[peer.rank].workspace, "\(name): rank \(group.rank), rank \(peer.rank)'s words")
                }
            }
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
                    // Through epGroupDispatchStacked the C struct's field is named.
                    let c = error.naming(CheckedStackedDispatch.Field.cNames).message
                    #expect(c.contains("call." + (field == "received = " ? "receivedTokens = " : field)), "\(c)")
                }
                #expect(mock.launches == before, "\(field)")
            }
            refused({ $0.received = Self.part(a, "recv", group.rank)! }, "received = ", "buffer slots")
            refused({ $0.receivedTopkIdx = Self.part(a, "recvIdx", group.rank) }, "receivedTopkIdx = ", "slot 0's own buffer")
            refused({ $0.receivedTopkWeights = Self.part(a, "recvW", group.rank) }, "receivedTopkWeights = ", "slot 0's own buffer")
            refused({ $0.receivedTopkIdx?.dtype = .i64 }, "receivedTopkIdx = ", "i32")
            refused({ $0.tokens = config.maxTokensPerRank + 1 }, "tokens", "maxTokensPerRank")
            let before = mock.launches
            try group.combine(handle, stacked: StackedCombine(expertOutputs: Self.stacked(group.slots[0].expertOutputs)!, combined: Self.part(a, "out", group.rank)!))
            #expect(mock.launches == before + 1)
        }
    }
}
