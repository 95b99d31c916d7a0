import ExpertParallel
import Testing

/// A call refused before it reaches the exchange (a C caller's malformed struct) still takes its
/// place among the ranks (`HostRank.refuse`): the others fail at once, and every rank's next step
/// runs in step and is correct. Found by the fuzzer as a trap: the ranks' rounds went out of step.
@Suite("Refused calls keep the ranks in step")
struct RefusedCallTests {
    static let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .f32,
                                    maxTokensPerRank: 2, timeout: .seconds(5))
    static let refusal = EPError.invalidArgument(field: "config.structSize", value: "12", requirement: "must be 16")

    /// One rank's tensors: tokens of value `rank + 1`, experts 0 and 3, weights 0.25 and 0.5.
    struct Tensors: Sendable {
        let x: HostTensor, idx: HostTensor, w: HostTensor, received: HostTensor, y: HostTensor
        init(rank: Int) throws {
            (x, idx, w) = (try HostTensor(.f32, [1, 8]), try HostTensor(.i32, [1, 2]), try HostTensor(.f32, [1, 2]))
            (received, y) = (try HostTensor(.f32, RefusedCallTests.config.receiveShape), try HostTensor(.f32, [1, 8]))
            try x.copy(from: [Float](repeating: Float(rank + 1), count: 8))
            try idx.copy(from: [Int32(0), Int32(3)])
            try w.copy(from: [Float(0.25), Float(0.5)])
        }
    }

    /// Runs `refused` on rank 0 (refused with `refusal`) while rank 1 makes the real call, then a
    /// whole good step on both ranks, and returns (rank 1's error, each rank's combined row).
    func refuseThenStep(_ refused: HostRank.RefusedCall) throws -> (EPError?, [[Float]]) {
        let group = try HostGroup(Self.config)
        let tensors = try (0..<2).map { try Tensors(rank: $0) }
        let handles = try (0..<2).map { try group[$0].makeHandle() }
        // Before the refused call: the step so far, on both ranks.
        if refused != .update {
            _ = group.run { rank throws(EPError) in try rank.update(handles[rank.rank], topkIdx: tensors[rank.rank].idx.ref) }
        }
        if refused == .combine {
            _ = group.run { rank throws(EPError) -> LayoutInfo in
                let t = tensors[rank.rank]
                return try rank.dispatch(handles[rank.rank], DispatchInput(tokens: t.x.ref), into: DispatchOutput(tokens: t.received.ref))
            }
        }
        let results = group.run { rank throws(EPError) in
            let t = tensors[rank.rank], handle = handles[rank.rank]
            if rank.rank == 0 { try rank.refuse(refused, handle, Self.refusal) }
            switch refused {
            case .update: try rank.update(handle, topkIdx: t.idx.ref)
            case .dispatch: _ = try rank.dispatch(handle, DispatchInput(tokens: t.x.ref), into: DispatchOutput(tokens: t.received.ref))
            case .combine:
                try rank.combine(handle, CombineInput(expertOutputs: t.received.ref, topkWeights: t.w.ref), into: CombineOutput(tokens: t.y.ref))
            }
        }
        #expect(throws: Self.refusal) { try results[0].get() }
        var peerError: EPError?
        if case .failure(let error) = results[1] { peerError = error }
        // A whole good step afterwards, on both ranks.
        let step = group.run { rank throws(EPError) -> [Float] in
            let t = tensors[rank.rank], handle = handles[rank.rank]
            try rank.update(handle, topkIdx: t.idx.ref)
            _ = try rank.dispatch(handle, DispatchInput(tokens: t.x.ref), into: DispatchOutput(tokens: t.received.ref))
            try rank.combine(handle, CombineInput(expertOutputs: t.received.ref, topkWeights: t.w.ref), into: CombineOutput(tokens: t.y.ref))
            return try t.y.array(of: Float.self)
        }
        return (peerError, try step.map { try $0.get() })
    }

    @Test(arguments: [HostRank.RefusedCall.update, .dispatch, .combine])
    func theOtherRankFailsAtOnceAndTheNextStepIsCorrect(_ call: HostRank.RefusedCall) throws {
        let start = ContinuousClock.now
        let (peerError, combined) = try refuseThenStep(call)
        #expect(ContinuousClock.now - start < .seconds(4), "no rank waited out the 5 s timeout")
        guard case .peerFailed(rank: 1, peer: 0, _)? = peerError else {
            Issue.record("rank 1 should fail because rank 0's call was refused; got \(peerError.map { "\($0)" } ?? "success")")
            return
        }
        // Identity experts: each token comes back as 0.25 x + 0.5 x.
        #expect(combined[0] == [Float](repeating: 0.75, count: 8))
        #expect(combined[1] == [Float](repeating: 1.5, count: 8))
    }
}
