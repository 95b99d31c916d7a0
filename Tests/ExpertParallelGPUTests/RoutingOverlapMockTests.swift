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

    /// An NCCL rank's stacked calls: a dispatch of the step again whose counts, or a combine from
    /// the slot's own expert outputs whose rows, are the step's routing. Before, both went
    /// unchecked (the per-rank calls and the stacked combine from a caller's tensor checked it).
    @Test func anNCCLRanksStackedCallsOverTheStepsRoutingAreRefused() throws {
        var config = StackedCallMockTests.cases[0].1   // LL expert-major
        config.ranks = 1
        let b = 2
        try NCCLStackedCallMockTests.step(config, tokens: b) { mock, device, group, a, handle in
            // The step's routing is the start of the rows a combine would write: [b, hidden] of the group's type.
            let rows = try DeviceTensor(config.elementType, [b, config.hidden], on: device)
            var routing = rows.ref
            routing.dtype = .i32
            routing.shape = [b, config.topK]
            var bytes = [UInt8](repeating: 0, count: b * config.hidden * config.elementType.byteSize)
            for i in 0..<(b * config.topK) { withUnsafeBytes(of: Int32(i % config.experts)) { bytes.replaceSubrange(4 * i..<4 * i + 4, with: $0) } }
            try bytes.withUnsafeBytes { try rows.upload($0.baseAddress!) }
            let slot = 0, buffers = group.slots[slot]
            var call = NCCLStackedCallMockTests.dispatch(a, group, slot: slot, tokens: b, routing: false)
            call.topkIdx = StackedTensor(routing)
            try group.dispatch(handle, stacked: call)
            let launches = mock.launches
            // Again (the step's routing), its counts over that routing.
            var counts = routing
            counts.shape = [config.localExperts]
            call.topkIdx = nil
            call.expertCounts = StackedTensor(counts)
            #expect {
                try group.dispatch(handle, stacked: call, direction: .backward)
            } throws: { error in
                "\(error)".hasPrefix("invalid argument: expertCounts[rank 0].address = ") && "\(error)".contains("; must not overlap the step's topkIdx[rank 0] (")
            }
            #expect(mock.launches == launches, "a refused dispatch launches nothing")
            let combine = StackedCombine(expertOutputs: StackedTensor(buffers.expertOutputs), topkWeights: NCCLStackedCallMockTests.part(a, "w", 0),
                                         combined: StackedTensor(rows.ref))
            #expect {
                try group.combine(handle, stacked: combine)
            } throws: { error in
                "\(error)".hasPrefix("invalid argument: combined[rank 0].address = ") && "\(error)".contains("; must not overlap the step's topkIdx[rank 0] (")
            }
            #expect(mock.launches == launches, "a refused combine launches nothing")
            var fine = combine
            fine.combined = NCCLStackedCallMockTests.part(a, "out", 0)!
            try group.combine(handle, stacked: fine)
            #expect(mock.launches > launches)
        }
    }
}
