import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// Several steps in flight on one GPU group: each handle keeps its own routing metadata, so
/// steps interleave, many layers' handles live at once, and a graph replays two steps on two
/// buffer slots. Every result is compared with the CPU oracle bit for bit.
@Suite(.enabled(if: gpuTestsEnabled && sharedDevice != nil, "needs a GPU (EP_GPU_TESTS=1)"))
struct StepHandleGPUTests {
    static let layouts: [Layout] = [.expertMajor, .rankMajor, .flat, .expertMajorPadded(alignment: 4)]

    static func config(_ layout: Layout) -> GroupConfig {
        .forLayout(layout, ranks: 4, experts: 16, topK: 3, hidden: 64, elementType: .bf16, maxTokensPerRank: 12)
    }

    @Test(arguments: layouts, launchModesOfThisPass)
    func interleavedHandlesMatchTheOracle(_ layout: Layout, _ mode: LaunchMode) throws {
        let config = Self.config(layout)
        let group = try VirtualGPUGroup(config, device: try #require(sharedDevice))
        let tokensA = [12, 7, 0, 12], tokensB = [3, 12, 12, 9]
        let inputsA = try StepInputs(config: config, tokens: tokensA, seed: 41), inputsB = try StepInputs(config: config, tokens: tokensB, seed: 42)
        // Two buffer slots (A's and B's rows), and a third for A's backward dispatch.
        let a = try GPUStep(config, group.device, tokens: tokensA), b = try GPUStep(config, group.device, tokens: tokensB)
        let again = try GPUStep(config, group.device, tokens: tokensA)
        for (step, inputs) in [(a, inputsA), (b, inputsB), (again, inputsA)] {
            try step.upload(inputs)
            try step.poison()
        }
        let handleA = try group.makeHandle(), handleB = try group.makeHandle()
        let options = CallOptions(nil, mode: mode)
        try group.update(handleA, topkIdx: a.idx.map(\.ref), options: options)
        try group.update(handleB, topkIdx: b.idx.map(\.ref), options: options)
        try a.dispatch(group, handleA, options: options)
        try b.dispatch(group, handleB, options: options)
        try b.combine(group, handleB, options: options)
        try a.combine(group, handleA, options: options)
        try again.dispatch(group, handleA, direction: .backward, options: options)
        expectMatch(try a.results(group, handleA), try oracleStep(config, inputsA), "\(layout) A")
        expectMatch(try b.results(group, handleB), try oracleStep(config, inputsB), "\(layout) B")
        let backward = try oracleStep(config, inputsA, direction: .backward)
        let received = try again.receivedBytes()
        for r in 0..<config.ranks {
            expectSameBytes(received[r], backward[r]!.received, "\(layout) backward dispatch of A, rank \(r)")
        }
    }

    @Test(arguments: layouts)
    func sixteenLayersShareOneBufferSlotInOrder(_ layout: Layout) throws {
        let config = Self.config(layout)
        let group = try VirtualGPUGroup(config, device: try #require(sharedDevice))
        let tokens = [12, 5, 12, 1]
        let layers = try (0..<16).map { try StepInputs(config: config, tokens: tokens, seed: 700 + UInt64($0)) }
        // Each layer's routing stays in its own tensors until its combine; the rows share one slot.
        let routings = try layers.map { inputs in
            let step = try GPUStep(config, group.device, tokens: tokens)
            try step.upload(inputs)
            return step
        }
        let handles = try layers.map { _ in try group.makeHandle() }
        for (handle, routing) in zip(handles, routings) { try group.update(handle, topkIdx: routing.idx.map(\.ref)) }
        let slot = try GPUStep(config, group.device, tokens: tokens)
        for (layer, inputs) in layers.enumerated() {
            try slot.upload(inputs)
            try slot.poison()
            try slot.dispatch(group, handles[layer])
            try slot.combine(group, handles[layer])
            expectMatch(try slot.results(group, handles[layer]), try oracleStep(config, inputs), "\(layout) layer \(layer)")
        }
        withExtendedLifetime(routings) {}   // the routing tensors must outlive every layer's combine
        for handle in handles { handle.release() }
        #expect(throws: EPError.self) { try slot.dispatch(group, handles[0]) }
    }

    @Test(arguments: [Layout.expertMajor, .flat])
    func graphOfTwoStepsOnTwoSlotsReplaysWithNewRouting(_ layout: Layout) throws {
        let config = Self.config(layout)
        let device = try #require(sharedDevice)
        let group = try VirtualGPUGroup(config, device: device)
        let tokensA = [12, 9, 12, 4], tokensB = [6, 12, 2, 12]
        let a = try GPUStep(config, device, tokens: tokensA), b = try GPUStep(config, device, tokens: tokensB)
        try a.upload(StepInputs(config: config, tokens: tokensA, seed: 1))
        try b.upload(StepInputs(config: config, tokens: tokensB, seed: 2))
        let handleA = try group.makeHandle(), handleB = try group.makeHandle()
        let driver = device.driver
        try driver.beginCapture(on: group.stream)
        try group.update(handleA, topkIdx: a.idx.map(\.ref))
        try group.update(handleB, topkIdx: b.idx.map(\.ref))
        try a.dispatch(group, handleA)
        try b.dispatch(group, handleB)
        try b.combine(group, handleB)
        try a.combine(group, handleA)
        let graph = try driver.endCapture(on: group.stream)
        let exec = try driver.instantiate(graph)
        defer { try? driver.destroy(exec); try? driver.destroy(graph) }
        for replay in 0..<100 {
            let inputsA = try StepInputs(config: config, tokens: tokensA, seed: 3000 + UInt64(replay))
            let inputsB = try StepInputs(config: config, tokens: tokensB, seed: 5000 + UInt64(replay), skew: replay % 2 == 0 ? 0 : 2)
            try a.upload(inputsA)
            try b.upload(inputsB)
            try a.poison()
            try b.poison()
            try driver.launch(exec, on: group.stream)
            expectMatch(try a.results(group, handleA), try oracleStep(config, inputsA), "\(layout) replay \(replay) A")
            expectMatch(try b.results(group, handleB), try oracleStep(config, inputsB), "\(layout) replay \(replay) B")
        }
    }
}

extension StepHandleGPUTests {
    /// A step voided on the device has no layout, even after `checkStatus()` has reported and
    /// cleared the cause; a masked rank's layout is all zeros, as the oracle's.
    @Test func aVoidStepHasNoLayoutAndAMaskedRankAnEmptyOne() throws {
        let config = Self.config(.flat)
        let device = try #require(sharedDevice)
        let group = try VirtualGPUGroup(config, device: device)
        let tokens = [4, 4, 4, 4]
        var inputs = try StepInputs(config: config, tokens: tokens, seed: 8, minusOneRate: 0)
        inputs.routing[2][1] = 99
        let step = try GPUStep(config, device, tokens: tokens)
        try step.upload(inputs)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: step.idx.map(\.ref))
        #expect(throws: EPError.self) { try group.checkStatus() }
        try group.checkStatus()   // reported once, then cleared
        #expect(throws: EPError.self) { _ = try group.layoutInfo(handle, rank: 0) }
        try group.deactivate(rank: 3)
        let good = try StepInputs(config: config, tokens: tokens, seed: 9)
        try step.upload(good)
        try group.update(handle, topkIdx: step.idx.map(\.ref))
        try step.dispatch(group, handle)
        try group.checkStatus()
        let masked = try group.layoutInfo(handle, rank: 3)
        #expect(masked.receivedTotal == 0 && masked.expertCounters.allSatisfy { $0 == 0 } && masked.expertOffsets.allSatisfy { $0 == 0 })
        let expected = try oracleStep(config, good, masked: [3])
        #expect(try group.layoutInfo(handle, rank: 0) == expected[0]!.layout)
    }
}

/// The device memory a handle holds is small next to the group's row buffers.
struct StepHandleSizeTests {
    @Test func anLLStandardHandleIsUnderOnePercentOfTheRowBuffers() throws {
        let config = try GroupConfig(algorithm: .lowLatency, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 128).validated()
        let handleBytes = StepWorkspace(config).handleStride * config.ranks
        // Per rank: the receive rows and the expert outputs, [L, R*Bmax, H] each.
        let rowBytes = 2 * config.receiveCapacity * config.rowBytes * config.ranks
        #expect(handleBytes * 100 <= rowBytes, "a handle holds \(handleBytes) bytes; the rows \(rowBytes)")
        #expect(handleBytes < 100_000)
    }

    @Test func anHTStandardHandleIsUnderOnePercentOfTheRowBuffers() throws {
        let config = try GroupConfig(algorithm: .highThroughput, ranks: 8, experts: 256, topK: 8, hidden: 7168, maxTokensPerRank: 4096).validated()
        let handleBytes = StepWorkspace(config).handleStride * config.ranks
        let rowBytes = 2 * config.receiveCapacity * config.rowBytes * config.ranks
        #expect(handleBytes * 100 <= rowBytes, "a handle holds \(handleBytes) bytes; the rows \(rowBytes)")
    }
}

extension GPUStep {
    func dispatch(_ group: VirtualGPUGroup, _ handle: GPUStepHandle, direction: PassDirection = .forward, options: CallOptions = CallOptions()) throws {
        try group.dispatch(
            handle, (0..<config.ranks).map { DispatchInput(tokens: x[$0].ref, topkWeights: w[$0].ref) },
            into: (0..<config.ranks).map { DispatchOutput(tokens: received[$0].ref, topkIdx: receivedIdx[$0]?.ref, topkWeights: receivedWeights[$0]?.ref) },
            direction: direction, options: options)
    }

    func combine(_ group: VirtualGPUGroup, _ handle: GPUStepHandle, options: CallOptions = CallOptions()) throws {
        let inputs = (0..<config.ranks).map { r in
            CombineInput(expertOutputs: y[r].ref, topkWeights: config.layout == .expertMajor ? w[r].ref : config.isExpertMajorHT ? receivedWeights[r]!.ref : nil)
        }
        try group.combine(handle, inputs, into: (0..<config.ranks).map { CombineOutput(tokens: combined[$0].ref) }, options: options)
    }

    /// The results of `handle`'s forward step.
    func results(_ group: VirtualGPUGroup, _ handle: GPUStepHandle) throws -> [StepResult] {
        try group.checkStatus()
        return try (0..<config.ranks).map { r in
            StepResult(received: try bytes(received[r]), receivedIdx: try receivedIdx[r].map(bytes),
                       receivedWeights: try receivedWeights[r].map(bytes), combined: try bytes(combined[r]),
                       layout: try group.layoutInfo(handle, rank: r))
        }
    }

    func receivedBytes() throws -> [[UInt8]] { try received.map(bytes) }

    private func bytes(_ t: DeviceTensor) throws -> [UInt8] {
        let h = try HostTensor(t.dtype, t.shape)
        try t.download(into: h)
        return h.bytes()
    }
}
