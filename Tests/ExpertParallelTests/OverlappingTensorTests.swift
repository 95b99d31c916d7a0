import ExpertParallel
import Testing

/// An output that shares memory with an input or another output of its call is refused by name
/// before anything moves, and what the caller passed is left as it was: before, the call ran and
/// wrote one tensor's values over the other's (received weights over received ids, combined rows
/// over the weights they were computed from).
@Suite("Overlapping outputs are refused")
struct OverlappingTensorTests {
    static let ll = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .f32,
                                maxTokensPerRank: 2, timeout: .seconds(5))
    static let ht = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .f32,
                                maxTokensPerRank: 2, maxReceivedTokensPerRank: 4, layout: .flat, timeout: .seconds(5))

    /// A view of `tensor`'s memory from element `offset` on, as `dtype` of `shape`.
    static func view(_ tensor: HostTensor, _ dtype: DataType, _ shape: [Int], offset: Int = 0) -> TensorRef {
        TensorRef(address: tensor.storage + offset * tensor.dtype.byteSize, dtype: dtype, shape: shape, owner: tensor)
    }

    /// Each rank's routing (experts 0 and 3), rows of `rank + 1` and weights 0.25, 0.5.
    struct Rank {
        let x: HostTensor, idx: HostTensor, w: HostTensor
        init(_ rank: Int) throws {
            (x, idx, w) = (try HostTensor(.f32, [1, 8]), try HostTensor(.i32, [1, 2]), try HostTensor(.f32, [1, 2]))
            try x.copy(from: [Float](repeating: Float(rank + 1), count: 8))
            try idx.copy(from: [Int32(0), Int32(3)])
            try w.copy(from: [Float(0.25), Float(0.5)])
        }
    }

    @Test("received weights over the received ids are refused, naming both; the ids are untouched")
    func receivedWeightsOverIds() throws {
        let group = try HostGroup(Self.ht)
        let ranks = try (0..<2).map(Rank.init)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: ranks.map(\.idx.ref))
        let received = try (0..<2).map { _ in try HostTensor(.f32, Self.ht.receiveShape) }
        let ids = try (0..<2).map { _ in try HostTensor(.i32, [4, 2]) }
        for t in ids { try t.copy(from: [Int32](repeating: 7, count: 8)) }
        let outputs = (0..<2).map {
            DispatchOutput(tokens: received[$0].ref, topkIdx: ids[$0].ref, topkWeights: Self.view(ids[$0], .f32, [4, 2]))
        }
        let inputs = ranks.map { DispatchInput(tokens: $0.x.ref, topkWeights: $0.w.ref) }
        #expect {
            try group.dispatch(handle, inputs, into: outputs)
        } throws: { error in
            "\(error)".contains("invalid argument: output.topkIdx.address = ") && "\(error)".contains("(32 bytes); must not overlap output.topkWeights (")
        }
        #expect(try ids.allSatisfy { try $0.array(of: Int32.self) == [Int32](repeating: 7, count: 8) })
    }

    @Test("received rows over the input rows are refused; the input is untouched")
    func receivedRowsOverInput() throws {
        let group = try HostGroup(Self.ll)
        let ranks = try (0..<2).map(Rank.init)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: ranks.map(\.idx.ref))
        // Rank 1's input rows are the last row of its own receive buffer.
        let received = try (0..<2).map { _ in try HostTensor(.f32, Self.ll.receiveShape) }
        let last = received[1].elementCount - 8
        try received[1].copy(from: [Float](repeating: 0, count: last) + [Float](repeating: 2, count: 8))
        let inputs = [DispatchInput(tokens: ranks[0].x.ref), DispatchInput(tokens: Self.view(received[1], .f32, [1, 8], offset: last))]
        #expect(throws: EPError.self) { try group.dispatch(handle, inputs, into: received.map { DispatchOutput(tokens: $0.ref) }) }
        #expect(try Array(received[1].array(of: Float.self)[...]) == [Float](repeating: 0, count: last) + [Float](repeating: 2, count: 8))
        #expect {
            try Self.ll.validateDispatch(inputs[1], DispatchOutput(tokens: received[1].ref), tokens: 1)
        } throws: { error in
            "\(error)".contains("output.tokens.address") && "\(error)".contains("must not overlap input.tokens")
        }
    }

    @Test("combined rows over the weights they are computed from are refused; the weights are untouched")
    func combinedRowsOverWeights() throws {
        let group = try HostGroup(Self.ll)
        let ranks = try (0..<2).map(Rank.init)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: ranks.map(\.idx.ref))
        let received = try (0..<2).map { _ in try HostTensor(.f32, Self.ll.receiveShape) }
        try group.dispatch(handle, ranks.map { DispatchInput(tokens: $0.x.ref) }, into: received.map { DispatchOutput(tokens: $0.ref) })
        // Each rank's weights are the first two floats of its combined row.
        let rows = try (0..<2).map { _ in try HostTensor(.f32, [1, 8]) }
        for t in rows { try t.copy(from: [Float(0.25), Float(0.5)] + [Float](repeating: 9, count: 6)) }
        let inputs = (0..<2).map { CombineInput(expertOutputs: received[$0].ref, topkWeights: Self.view(rows[$0], .f32, [1, 2])) }
        #expect {
            try group.combine(handle, inputs, into: rows.map { CombineOutput(tokens: $0.ref) })
        } throws: { error in
            "\(error)".contains("output.tokens.address") && "\(error)".contains("must not overlap input.topkWeights")
        }
        #expect(try rows.allSatisfy { try $0.array(of: Float.self) == [Float(0.25), Float(0.5)] + [Float](repeating: 9, count: 6) })
        // Tensors that only touch (one ends where the other starts) share no byte: accepted.
        let both = try (0..<2).map { _ in try HostTensor(.f32, [1, 10]) }
        for t in both { try t.copy(from: [Float](repeating: 0, count: 8) + [Float(0.25), Float(0.5)]) }
        try group.combine(handle, (0..<2).map { CombineInput(expertOutputs: received[$0].ref, topkWeights: Self.view(both[$0], .f32, [1, 2], offset: 8)) },
                          into: both.map { CombineOutput(tokens: Self.view($0, .f32, [1, 8])) })
        #expect(try both[0].array(of: Float.self)[0] == 0.75 && both[1].array(of: Float.self)[0] == 1.5)
    }

    @Test("a stacked call's output part over another array's part of any rank is refused, naming both ranks' parts")
    func stackedParts() throws {
        let shapes = try CallShapes(Self.ll)
        let receivedBytes = Self.ll.receiveShape.reduce(1, *) * 4, base: UInt64 = 1 << 20
        func call(inputs: UInt64, stride: Int = 0) -> StackedDispatch {
            StackedDispatch(tokens: 1, topkIdx: nil, inputs: StackedTensor(address: inputs, dtype: .f32, location: .host, rankStride: stride),
                            received: StackedTensor(address: base, dtype: .f32, location: .host, rankStride: stride))
        }
        // Rank 0's input rows are where rank 1's received rows go.
        #expect(throws: EPError.invalidArgument(
            field: "received.address", value: "rank 1's part at 0x\(String(base + UInt64(receivedBytes), radix: 16)) (\(receivedBytes) bytes)",
            requirement: "must not overlap inputs (rank 0's part at 0x\(String(base + UInt64(receivedBytes), radix: 16)), 32 bytes): an output may share no byte with an input or another output")) {
            _ = try CheckedStackedDispatch(call(inputs: base + UInt64(receivedBytes)), shapes: shapes, location: .host, stepTokens: 1)
        }
        // Interleaved parts (each rank's input rows right after its received rows) share no byte: accepted.
        _ = try CheckedStackedDispatch(call(inputs: base + UInt64(receivedBytes), stride: receivedBytes + 32), shapes: shapes, location: .host, stepTokens: 1)
        // Arrays apart: accepted.
        _ = try CheckedStackedDispatch(call(inputs: base + UInt64(2 * receivedBytes)), shapes: shapes, location: .host, stepTokens: 1)
    }
}
