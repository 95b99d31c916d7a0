import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// A virtual GPU group's one launch runs every rank: an output of one rank over an argument of
/// another is refused by name before anything is launched (mock driver, no GPU).
struct CrossRankOverlapMockTests {
    static let config = GroupConfig(
        algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .f32, maxTokensPerRank: 2, layout: .expertMajor)

    /// Each rank's tensors on `device`: routing to experts 0 and 3, rows, weights, receive and combine buffers.
    struct Tensors {
        var idx: [DeviceTensor] = [], x: [DeviceTensor] = [], w: [DeviceTensor] = [], received: [DeviceTensor] = [], combined: [DeviceTensor] = []
        init(_ config: GroupConfig, device: GPUDevice) throws(EPError) {
            for _ in 0..<config.ranks {
                let ids = try DeviceTensor(.i32, [2, config.topK], on: device)
                [Int32(0), 3, 1, -1].withUnsafeBytes { _ = try? ids.upload($0.baseAddress!) }
                idx.append(ids)
                x.append(try DeviceTensor(.f32, [2, config.hidden], on: device))
                w.append(try DeviceTensor(.f32, [2, config.topK], on: device))
                received.append(try DeviceTensor(.f32, config.receiveShape, on: device))
                combined.append(try DeviceTensor(.f32, [2, config.hidden], on: device))
            }
        }
    }

    @Test func anOutputOverAnotherRanksArgumentIsRefusedBeforeAnyLaunch() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let group = try VirtualGPUGroup(Self.config, device: device)
            let t = try Tensors(Self.config, device: device)
            try group.update(topkIdx: t.idx.map(\.ref))
            // Rank 1's input rows are the start of rank 0's receive buffer.
            var inside = t.received[0].ref
            inside.shape = [2, Self.config.hidden]
            let launches = mock.launches
            #expect {
                try group.dispatch([DispatchInput(tokens: t.x[0].ref), DispatchInput(tokens: inside)], into: t.received.map { DispatchOutput(tokens: $0.ref) })
            } throws: { error in
                "\(error)".hasPrefix("invalid argument: outputs[0].tokens.address = ") && "\(error)".contains("; must not overlap inputs[1].tokens (")
            }
            #expect(mock.launches == launches, "a refused dispatch launches nothing")
            try group.dispatch(t.x.map { DispatchInput(tokens: $0.ref) }, into: t.received.map { DispatchOutput(tokens: $0.ref) })
            // Rank 1 combines into rank 0's weights.
            var over = t.w[0].ref
            over.shape = [2, Self.config.hidden]
            let inputs = (0..<2).map { CombineInput(expertOutputs: t.received[$0].ref, topkWeights: t.w[$0].ref) }
            #expect {
                try group.combine(inputs, into: [CombineOutput(tokens: t.combined[0].ref), CombineOutput(tokens: over)])
            } throws: { error in
                "\(error)".hasPrefix("invalid argument: outputs[1].tokens.address = ") && "\(error)".contains("; must not overlap inputs[0].topkWeights (")
            }
            try group.combine(inputs, into: t.combined.map { CombineOutput(tokens: $0.ref) })
        }
    }
}
