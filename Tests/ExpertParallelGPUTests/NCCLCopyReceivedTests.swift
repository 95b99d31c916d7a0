import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Testing

/// An NCCL rank's received rows copied out of its buffer slot into the caller's tensors: only
/// the received zones (`copyReceived`, epGroupCopyReceived), and a dispatch into the caller's
/// tensors (`dispatch(_:copyingInto:)`) that fills the rest with zeros; every layout, forward
/// and backward, against the CPU oracle, on one GPU (a communicator of one rank).
@Suite(.enabled(if: gpuTestsEnabled && sharedDevice != nil && (try? NCCLLibrary.shared()) != nil, "needs a GPU and NCCL (EP_GPU_TESTS=1)"))
struct NCCLCopyReceivedTests {
    static let poison: UInt8 = 0xA5

    @Test(arguments: NCCLOneRankTests.cases)
    func onlyTheReceivedZonesAreCopiedOut(_ layout: Layout, _ direction: PassDirection) throws {
        let config = GroupConfig.forLayout(layout, ranks: 1, experts: 8, topK: 3, hidden: 96, elementType: .bf16, maxTokensPerRank: 20)
        try withOneRankGroup(config) { group in
            let inputs = try StepInputs(config: config, tokens: [13], seed: 23)
            let step = try OneRankStep(group, inputs)
            let expected = try #require(try oracleStep(config, inputs, direction: direction)[0])
            let handle = try group.makeHandle()
            defer { handle.release() }
            try group.update(handle, topkIdx: [step.idx.ref])
            try step.dispatch(group, handle, slot: 0, direction: direction)
            let caller = try DeviceTensor(config.receiveElementType, config.receiveShape, on: group.device)
            try group.device.driver.fill(caller.ref.devicePointer, byte: Self.poison, byteCount: caller.ref.byteCount)
            try group.copyReceived(handle, into: caller.ref)
            try group.checkStatus()
            try expectZones(config, caller, expected, outside: Self.poison, "\(layout) \(direction), copyReceived")
        }
    }

    /// (An NCCL rank's dispatch is the same forward and backward: the forward cases' layouts.)
    @Test(arguments: NCCLOneRankTests.cases.filter { $0.1 == .forward }.map(\.0))
    func aDispatchIntoTheCallersTensorsReadsZeroOutsideTheZones(_ layout: Layout) throws {
        let direction = PassDirection.forward
        let config = GroupConfig.forLayout(layout, ranks: 1, experts: 8, topK: 3, hidden: 96, elementType: .bf16, maxTokensPerRank: 20)
        try withOneRankGroup(config) { group in
            let inputs = try StepInputs(config: config, tokens: [13], seed: 29)
            let step = try OneRankStep(group, inputs)
            let expected = try #require(try oracleStep(config, inputs, direction: direction)[0])
            let driver = group.device.driver, slot = group.slots[0].receivedTokens
            // The slot holds another step's rows everywhere: none of them may reach the caller.
            try driver.fill(slot.devicePointer, byte: Self.poison, byteCount: slot.byteCount)
            let handle = try group.makeHandle()
            defer { handle.release() }
            try group.update(handle, topkIdx: [step.idx.ref])
            let tokens = try DeviceTensor(config.receiveElementType, config.receiveShape, on: group.device)
            try driver.fill(tokens.ref.devicePointer, byte: Self.poison, byteCount: tokens.ref.byteCount)
            let routing = try config.receiveRoutingShape.map { shape throws(EPError) in
                (try DeviceTensor(.i32, shape, on: group.device), try DeviceTensor(.f32, shape, on: group.device))
            }
            let output = DispatchOutput(tokens: tokens.ref, topkIdx: routing?.0.ref, topkWeights: routing?.1.ref)
            let input = DispatchInput(tokens: step.x.ref, topkWeights: step.w.ref)
            try group.dispatch(input, copyingInto: output, handle: handle)
            try group.checkStatus()
            try expectZones(config, tokens, expected, outside: 0, "\(layout) \(direction), dispatch copyingInto")
        }
    }

    /// `tensor` (receive-shaped rows) holds `expected`'s received rows in its zones and bytes
    /// `outside` everywhere else.
    private func expectZones(_ config: GroupConfig, _ tensor: DeviceTensor, _ expected: StepResult, outside: UInt8, _ what: String) throws {
        let host = try HostTensor(config.receiveElementType, config.receiveShape)
        try tensor.download(into: host)
        let got = host.bytes(), rowBytes = got.count / config.receiveShape.dropLast().reduce(1, *)
        var inZones = Array(repeating: false, count: got.count / rowBytes)
        for (start, count) in receivedZones(config, expected.layout) where count > 0 {
            for row in start..<(start + count) { inZones[row] = true }
            let bytes = (start * rowBytes)..<((start + count) * rowBytes)
            expectSameBytes(got[bytes], expected.received[bytes], "\(what): rows \(start)..<\(start + count)")
        }
        #expect(inZones.contains(true) && inZones.contains(false), "\(what): the case has rows inside and outside the zones")
        if let row = inZones.indices.first(where: { !inZones[$0] && got[($0 * rowBytes)..<(($0 + 1) * rowBytes)].contains { $0 != outside } }) {
            Issue.record("\(what): row \(row), outside the received zones, is not \(outside)s")
        }
    }
}
