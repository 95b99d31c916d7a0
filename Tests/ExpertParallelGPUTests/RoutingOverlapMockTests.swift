import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// The device reads a step's routing again until its last combine (the header: it must stay
/// unchanged until then): a dispatch or combine whose output shares its bytes is refused by name
/// before any launch. Before, a dispatch could write its counts, or a combine its rows, over it.
/// (The host backend copies the routing at the update and keeps no address: nothing to check.)
struct RoutingOverlapMockTests {
    static let config = CrossRankOverlapMockTests.config

    @Test func outputsOverTheStepsRoutingAreRefused() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let group = try VirtualGPUGroup(Self.config, device: device)
            let t = try CrossRankOverlapMockTests.Tensors(Self.config, device: device)
            // Rank 0's routing is the start of a [4, 8] float buffer (both ranks' combined rows, stacked).
            let big = try DeviceTensor(.f32, [4, Self.config.hidden], on: device)
            var routing = big.ref
            routing.dtype = .i32
            routing.shape = [2, Self.config.topK]
            ([Int32(0), 3, 1, -1] + [Int32](repeating: 0, count: 28)).withUnsafeBytes { _ = try? big.upload($0.baseAddress!) }
            try group.update(topkIdx: [routing, t.idx[1].ref])
            let launches = mock.launches
            // Rank 1's counts over rank 0's routing.
            var counts = routing
            counts.shape = [Self.config.localExperts]
            let inputs = t.x.map { DispatchInput(tokens: $0.ref) }
            #expect {
                try group.dispatch(inputs, into: [DispatchOutput(tokens: t.received[0].ref), DispatchOutput(tokens: t.received[1].ref, expertCounts: counts)])
            } throws: { error in
                "\(error)".hasPrefix("invalid argument: outputs[1].expertCounts.address = ") && "\(error)".contains("; must not overlap the step's topkIdx[rank 0] (")
            }
            #expect(mock.launches == launches, "a refused dispatch launches nothing")
            try group.dispatch(inputs, into: t.received.map { DispatchOutput(tokens: $0.ref) })
            let dispatched = mock.launches
            // Rank 0 combines over its own routing.
            var rows = big.ref
            rows.shape = [2, Self.config.hidden]
            let combineInputs = (0..<2).map { CombineInput(expertOutputs: t.received[$0].ref, topkWeights: t.w[$0].ref) }
            #expect {
                try group.combine(combineInputs, into: [CombineOutput(tokens: rows), CombineOutput(tokens: t.combined[1].ref)])
            } throws: { error in
                "\(error)".hasPrefix("invalid argument: outputs[0].tokens.address = ") && "\(error)".contains("; must not overlap the step's topkIdx[rank 0] (")
            }
            // The stacked combine (rank r's rows at combined + r × stride): rank 0's part is the routing's buffer.
            let experts = try DeviceTensor(.f32, [2] + Self.config.receiveShape, on: device), weights = try DeviceTensor(.f32, [2, 2, 2], on: device)
            func packed(_ t: DeviceTensor) -> StackedTensor {
                StackedTensor(address: UInt64(UInt(bitPattern: t.ref.address)), dtype: .f32, location: .device(device.ordinal), rankStride: 0)
            }
            let stacked = StackedCombine(expertOutputs: packed(experts), topkWeights: packed(weights), combined: packed(big))
            #expect {
                try group.combine(group.implicitHandle, stacked: stacked)
            } throws: { error in
                "\(error)".hasPrefix("invalid argument: combined[rank 0].address = ") && "\(error)".contains("; must not overlap the step's topkIdx[rank 0] (")
            }
            #expect(mock.launches == dispatched, "a refused combine launches nothing")
            try group.combine(combineInputs, into: t.combined.map { CombineOutput(tokens: $0.ref) })
        }
    }
}
