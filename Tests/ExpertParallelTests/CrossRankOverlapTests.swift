@testable import ExpertParallel
import Testing

/// A collective call runs every rank at once: an output of one rank that shares bytes with an
/// argument of another is refused by name (both entries of the call's arrays) before anything
/// moves. Before, the per-rank checks saw one rank each and the call raced one rank's writes
/// against the other's reads.
@Suite("Overlaps across the ranks of a collective call are refused")
struct CrossRankOverlapTests {
    static let ll = OverlappingTensorTests.ll

    @Test("rank 0's received rows over rank 1's input rows: refused, naming both; the input is untouched")
    func receivedRowsOverAnotherRanksInput() throws {
        let group = try HostGroup(Self.ll)
        let ranks = try (0..<2).map(OverlappingTensorTests.Rank.init)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: ranks.map(\.idx.ref))
        let received = try (0..<2).map { _ in try HostTensor(.f32, Self.ll.receiveShape) }
        let last = received[0].elementCount - 8
        try received[0].copy(from: [Float](repeating: 0, count: last) + [Float](repeating: 2, count: 8))
        let inputs = [DispatchInput(tokens: ranks[0].x.ref), DispatchInput(tokens: OverlappingTensorTests.view(received[0], .f32, [1, 8], offset: last))]
        #expect {
            try group.dispatch(handle, inputs, into: received.map { DispatchOutput(tokens: $0.ref) })
        } throws: { error in
            "\(error)".hasPrefix("invalid argument: outputs[0].tokens.address = ") && "\(error)".contains("; must not overlap inputs[1].tokens (")
        }
        #expect(try received[0].array(of: Float.self) == [Float](repeating: 0, count: last) + [Float](repeating: 2, count: 8))
        // Apart, the same call runs.
        try group.dispatch(handle, ranks.map { DispatchInput(tokens: $0.x.ref) }, into: received.map { DispatchOutput(tokens: $0.ref) })
    }

    @Test("rank 1's combined rows over rank 0's weights: refused; the weights are untouched")
    func combinedRowsOverAnotherRanksWeights() throws {
        let group = try HostGroup(Self.ll)
        let ranks = try (0..<2).map(OverlappingTensorTests.Rank.init)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: ranks.map(\.idx.ref))
        let received = try (0..<2).map { _ in try HostTensor(.f32, Self.ll.receiveShape) }
        try group.dispatch(handle, ranks.map { DispatchInput(tokens: $0.x.ref) }, into: received.map { DispatchOutput(tokens: $0.ref) })
        // Rank 0's weights are the first two floats of the row rank 1 combines into.
        let rows = try HostTensor(.f32, [1, 8]), shared = try HostTensor(.f32, [1, 8])
        try shared.copy(from: [Float(0.25), Float(0.5)] + [Float](repeating: 9, count: 6))
        let inputs = [CombineInput(expertOutputs: received[0].ref, topkWeights: OverlappingTensorTests.view(shared, .f32, [1, 2])),
                      CombineInput(expertOutputs: received[1].ref, topkWeights: ranks[1].w.ref)]
        #expect {
            try group.combine(handle, inputs, into: [CombineOutput(tokens: rows.ref), CombineOutput(tokens: shared.ref)])
        } throws: { error in
            "\(error)".hasPrefix("invalid argument: outputs[1].tokens.address = ") && "\(error)".contains("; must not overlap inputs[0].topkWeights (")
        }
        #expect(try shared.array(of: Float.self) == [Float(0.25), Float(0.5)] + [Float](repeating: 9, count: 6))
        #expect(try rows.array(of: Float.self) == [Float](repeating: 0, count: 8))
    }

    @Test("a wrong shape of a rank is named as that, not as an overlap its bytes seemed to have")
    func aRanksOwnErrorComesFirst() throws {
        let group = try HostGroup(Self.ll)
        let ranks = try (0..<2).map(OverlappingTensorTests.Rank.init)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: ranks.map(\.idx.ref))
        let received = try (0..<2).map { _ in try HostTensor(.f32, Self.ll.receiveShape) }
        let wide = TensorRef(address: received[0].storage, dtype: .f32, shape: [1, 8], owner: received[0])
        let wrong = TensorRef(address: received[0].storage, dtype: .f32, shape: [1, 9], owner: received[0])
        #expect {
            try group.dispatch(handle, [DispatchInput(tokens: wrong), DispatchInput(tokens: wide)], into: received.map { DispatchOutput(tokens: $0.ref) })
        } throws: { error in
            "\(error)".hasPrefix("invalid argument: input.tokens.shape")
        }
    }

    @Test("a masked rank's arguments are not read: sharing an active rank's tensors is accepted")
    func maskedRanksAreSkipped() throws {
        let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .f32,
                                 maxTokensPerRank: 2, timeout: .seconds(5))
        let group = try HostGroup(config)
        try group.deactivate(rank: 1)
        let ranks = try (0..<2).map(OverlappingTensorTests.Rank.init)
        try ranks[0].idx.copy(from: [Int32(0), Int32(1)])
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: ranks.map(\.idx.ref))
        let received = try HostTensor(.f32, config.receiveShape), counts = try HostTensor(.i32, [config.localExperts])
        let output = DispatchOutput(tokens: received.ref, expertCounts: counts.ref)
        try group.dispatch(handle, ranks.map { DispatchInput(tokens: $0.x.ref) }, into: [output, output])
        #expect(try counts.array(of: Int32.self) == [1, 1])
    }

    /// The sweep finds an overlap exactly where some output shares a byte with another argument.
    @Test("the sweep agrees with comparing every pair")
    func sweepMatchesPairs() {
        var random = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let ranks = Int.random(in: 1...4, using: &random), slots = 3, outputs = 1
            let spans = (0..<ranks * slots).map { _ -> (Range<UInt>, MemoryLocation)? in
                if Int.random(in: 0..<5, using: &random) == 0 { return nil }
                let start = UInt.random(in: 0..<64, using: &random)
                return (start..<start + UInt.random(in: 0..<16, using: &random), Bool.random(using: &random) ? .host : .device(0))
            }
            func pairs() -> Bool {
                for a in spans.indices where a % slots < outputs {
                    for b in spans.indices where b != a {
                        guard let (x, p) = spans[a], let (y, q) = spans[b], p == q, x.overlaps(y) else { continue }
                        return true
                    }
                }
                return false
            }
            let found = TensorOverlap.firstAcrossRanks(0..<ranks, slots: slots, outputs: outputs) { spans[$0 * slots + $1] }
            #expect((found != nil) == pairs(), "\(spans)")
            if let (output, other) = found {
                #expect(output.slot < outputs && output.start < other.end && other.start < output.end && output.place == other.place)
            }
        }
    }
}
