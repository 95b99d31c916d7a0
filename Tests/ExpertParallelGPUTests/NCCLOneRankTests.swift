import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Testing

/// The NCCL rank group where one GPU can check it: a communicator of one rank, every layout,
/// forward and backward, two buffer slots in flight, compared with the CPU oracle bit for bit.
@Suite(.enabled(if: gpuTestsEnabled && sharedDevice != nil && (try? NCCLLibrary.shared()) != nil, "needs a GPU and NCCL (EP_GPU_TESTS=1)"))
struct NCCLOneRankTests {
    static let cases: [(Layout, PassDirection)] = [
        (.expertMajor, .forward), (.rankMajor, .forward), (.flat, .forward), (.flat, .backward),
        (.expertMajorPadded(alignment: 4), .forward), (.expertMajorPadded(alignment: 4), .backward),
    ]

    /// A step whose buffer slot a later dispatch reused cannot combine: its rows (and, HT
    /// expert-major, its per-slot weights) are gone; the error says so before anything launches.
    @Test func aCombineWhoseSlotWasReusedIsRefused() throws {
        let config = GroupConfig(algorithm: .lowLatency, ranks: 1, experts: 2, topK: 2, hidden: 8, elementType: .f32, maxTokensPerRank: 2)
        try withOneRankGroup(config) { group in
            let device = group.device
            let routing = try HostTensor(.i32, [2, config.topK])
            try routing.copy(from: [Int32(0), 1, 1, -1])   // distinct experts per token (fresh memory may repeat one)
            let idx = try DeviceTensor(.i32, [2, config.topK], on: device)
            try idx.upload(routing)
            let x = try DeviceTensor(.f32, [2, config.hidden], on: device), w = try DeviceTensor(.f32, [2, config.topK], on: device)
            let out = try DeviceTensor(.f32, [2, config.hidden], on: device)
            let a = try group.makeHandle(), b = try group.makeHandle()
            let input = DispatchInput(tokens: x.ref, topkWeights: w.ref)
            try group.update(a, topkIdx: [idx.ref])
            try group.update(b, topkIdx: [idx.ref])
            try group.dispatch(a, [input], slot: 0)
            try group.dispatch(b, [input], slot: 0)   // slot 0 now holds b's rows
            let combine = { (handle: GPUStepHandle) throws(EPError) in
                try group.combine(handle, [CombineInput(expertOutputs: group.slots[0].expertOutputs, topkWeights: w.ref)],
                                  into: [CombineOutput(tokens: out.ref)])
            }
            do {
                try combine(a)
                Issue.record("a combine of a step whose slot was reused was not refused")
            } catch {
                guard case EPError.wrongOrder(let message) = error else { throw error }
                #expect(message.contains("buffer slot 0") && message.contains("later dispatch"), "\(message)")
            }
            try combine(b)
            try group.checkStatus()
            a.release()
            b.release()
        }
    }

    @Test(arguments: cases)
    func oneRankGroupMatchesTheOracle(_ layout: Layout, _ direction: PassDirection) throws {
        let config = GroupConfig.forLayout(layout, ranks: 1, experts: 8, topK: 3, hidden: 96, elementType: .bf16, maxTokensPerRank: 20)
        try withOneRankGroup(config) { group in
            #expect(group.bufferSlots == 2)
            // Two steps in flight on the two slots: update A, update B, dispatch A, dispatch B, combine B, combine A.
            let steps = try [(StepInputs(config: config, tokens: [20], seed: 11), 0), (StepInputs(config: config, tokens: [13], seed: 12), 1)]
            let buffers = try steps.map { inputs, _ in try OneRankStep(group, inputs) }
            let handles = try steps.map { _ in try group.makeHandle() }
            for (handle, step) in zip(handles, buffers) { try group.update(handle, topkIdx: [step.idx.ref]) }
            for i in [0, 1] { try buffers[i].dispatch(group, handles[i], slot: steps[i].1, direction: direction) }
            for i in [1, 0] { try buffers[i].combine(group, handles[i], slot: steps[i].1, direction: direction) }
            try group.checkStatus()
            for i in [0, 1] {
                let expected = try #require(try oracleStep(config, steps[i].0, direction: direction)[0])
                let got = try buffers[i].result(group, handles[i], slot: steps[i].1, direction: direction)
                #expect(got.layout.expertCounters == expected.layout.expertCounters, "\(layout) step \(i): counters")
                #expect(got.layout.receivedTotal == expected.layout.receivedTotal, "\(layout) step \(i): received total")
                // Rows outside the received zones are unspecified here (the group's buffers are not poisoned).
                for (start, count) in receivedZones(config, expected.layout) {
                    let bytes = (start * config.rowBytes)..<((start + count) * config.rowBytes)
                    expectSameBytes(got.received[bytes], expected.received[bytes], "\(layout) step \(i): received rows \(start)..<\(start + count)")
                }
                expectSameBytes(got.combined, expected.combined, "\(layout) step \(i): combined rows")
                #expect(got.weightGradients == expected.weightGradients, "\(layout) step \(i): weight gradients")
            }
        }
    }

    /// The stacked dispatch with routing (what the C ABI's epGroupDispatchStacked and Python's
    /// NCCLGroup call): LL's update inside the dispatch launch, and with it off two launches;
    /// two steps in a row on one handle (the fused launch resets its words for the next), each
    /// the oracle's bits, FP8 quantised in the kernel too.
    @Test(arguments: [(Layout.expertMajor, false), (.rankMajor, false), (.expertMajor, true)], [true, false])
    func aStackedDispatchWithRoutingMatchesTheOracle(_ layoutAndFP8: (Layout, Bool), _ fused: Bool) throws {
        let (layout, fp8) = layoutAndFP8
        let config = fp8 ? FP8OracleTests.config(layout, ranks: 1, .ue8m0Block128, .quantize, maxTokens: 20)
            : GroupConfig.forLayout(layout, ranks: 1, experts: 8, topK: 3, hidden: 96, elementType: .bf16, maxTokensPerRank: 20)
        try withOneRankGroup(config, tuning: GPUTuning(fusesUpdate: fused)) { group in
            #expect(group.fusesUpdate == fused)
            let handle = try group.makeHandle()
            for (tokens, seed) in [(20, UInt64(51)), (7, 52)] {
                let inputs = try fp8 ? StepInputs(fp8: config, tokens: [tokens], seed: seed) : StepInputs(config: config, tokens: [tokens], seed: seed)
                let step = try OneRankStep(group, inputs)
                try group.dispatch(handle, stacked: StackedDispatch(
                    tokens: tokens, topkIdx: StackedTensor(step.idx.ref), inputs: StackedTensor(step.x.ref), topkWeights: StackedTensor(step.w.ref),
                    scales: step.scales.map { StackedTensor($0.ref) }, received: StackedTensor(group.slots[1].receivedTokens)))
                try step.combine(group, handle, slot: 1, direction: .forward)
                try group.checkStatus()
                let expected = try #require(try oracleStep(config, inputs)[0])
                let got = try step.result(group, handle, slot: 1, direction: .forward)
                let label = "\(layout)\(fp8 ? " fp8" : "") fused \(fused), \(tokens) tokens"
                #expect(got.layout.expertCounters == expected.layout.expertCounters, "\(label): counters")
                for (start, count) in receivedZones(config, expected.layout) {
                    let rows = (start * config.wireRowBytes)..<((start + count) * config.wireRowBytes)
                    expectSameBytes(got.received[rows], expected.received[rows], "\(label): received rows \(start)..<\(start + count)")
                    if let format = config.fp8Format {
                        let scales = (start * format.scaleWordsPerRow * 4)..<((start + count) * format.scaleWordsPerRow * 4)
                        expectSameBytes(got.scales?[scales], expected.scales?[scales], "\(label): received scales \(start)..<\(start + count)")
                    }
                }
                expectSameBytes(got.combined, expected.combined, "\(label): combined rows")
            }
            handle.release()
        }
    }

    /// A combine from the caller's own expert outputs (what the C ABI and Python do with a
    /// tensor that is not the slot's buffer) copies only the rows the step received into the
    /// buffer the peers read: every other row of it keeps what it held. Same bits as the oracle.
    @Test(arguments: cases)
    func aCallersExpertOutputsAreCopiedOnlyWhereReceived(_ layout: Layout, _ direction: PassDirection) throws {
        let config = GroupConfig.forLayout(layout, ranks: 1, experts: 8, topK: 3, hidden: 96, elementType: .bf16, maxTokensPerRank: 20)
        try withOneRankGroup(config) { group in
            let inputs = try StepInputs(config: config, tokens: [13], seed: 21)
            let step = try OneRankStep(group, inputs)
            let handle = try group.makeHandle()
            try group.update(handle, topkIdx: [step.idx.ref])
            try step.dispatch(group, handle, slot: 0, direction: direction)
            try group.checkStatus()
            let buffers = group.slots[0], driver = group.device.driver
            let poison: UInt8 = 0xA5
            try driver.fill(buffers.expertOutputs.devicePointer, byte: poison, byteCount: buffers.expertOutputs.byteCount)
            let callers = try DeviceTensor(config.elementType, config.receiveShape, on: group.device)
            try callers.upload(inputs.expertOutputs[0])
            try step.combine(group, handle, slot: 0, direction: direction, copyingFrom: callers.ref)
            try group.checkStatus()
            let expected = try #require(try oracleStep(config, inputs, direction: direction)[0])
            let got = try step.result(group, handle, slot: 0, direction: direction)
            expectSameBytes(got.combined, expected.combined, "\(layout) \(direction): combined rows")
            #expect(got.weightGradients == expected.weightGradients, "\(layout) \(direction): weight gradients")
            let shared = try HostTensor(config.elementType, config.receiveShape)
            try driver.copy(from: buffers.expertOutputs.devicePointer, to: shared.storage, byteCount: shared.byteCount)
            let sharedBytes = shared.bytes(), callerBytes = inputs.expertOutputs[0].bytes()
            var inZones = Array(repeating: false, count: config.receiveShape.dropLast().reduce(1, *))   // every row of the buffer
            for (start, count) in receivedZones(config, expected.layout) {
                for row in start..<(start + count) { inZones[row] = true }
                let bytes = (start * config.rowBytes)..<((start + count) * config.rowBytes)
                expectSameBytes(sharedBytes[bytes], callerBytes[bytes], "\(layout) \(direction): rows \(start)..<\(start + count) copied")
            }
            let untouched = inZones.indices.filter { !inZones[$0] }
            #expect(!untouched.isEmpty, "the case leaves rows outside the received zones")
            for row in untouched where sharedBytes[(row * config.rowBytes)..<((row + 1) * config.rowBytes)].contains(where: { $0 != poison }) {
                Issue.record("\(layout) \(direction): row \(row), outside the received zones, was written")
                break
            }
            handle.release()
        }
    }
}

/// Runs `body` with an NCCL rank group of one rank, destroyed before its communicator is
/// closed: the group's buffers are windows of the communicator, and deregistering them from a
/// closed one would touch freed memory. (A nested scope, not a `defer` beside the group:
/// Swift does not order a local's release against a `defer` of the same scope.)
func withOneRankGroup(_ config: GroupConfig, tuning: GPUTuning = GPUTuning(), _ body: (NCCLRankGroup) throws -> Void) throws {
    let device = try #require(sharedDevice)
    let nccl = try NCCLLibrary.shared()
    try device.makeCurrent()
    let comm = try nccl.initRank(ranks: 1, id: try nccl.uniqueID(), rank: 0)
    defer { try? nccl.close(comm) }
    try { () throws in
        let group = try NCCLRankGroup(config, device: device, comm: comm, nccl: nccl, tuning: tuning)
        try body(group)
    }()
}

/// The received zones of a layout as (first row, rows): one per local expert in LL expert-major
/// (each `R*Bmax` rows apart), else the first `receivedTotal` rows.
func receivedZones(_ config: GroupConfig, _ layout: LayoutInfo) -> [(Int, Int)] {
    guard config.layout == .expertMajor else { return [(0, layout.receivedTotal)] }
    return layout.expertCounters.enumerated().map { l, count in (l * config.ranks * config.maxTokensPerRank, count) }
}

/// One rank's tensors of one step, and the copies into the group's slot buffers the experts make.
struct OneRankStep {
    let config: GroupConfig
    let inputs: StepInputs
    let idx: DeviceTensor, x: DeviceTensor, w: DeviceTensor, combined: DeviceTensor, gradsOut: DeviceTensor
    /// FP8 pass-through: the scales of `x`.
    let scales: DeviceTensor?

    init(_ group: NCCLRankGroup, _ inputs: StepInputs) throws {
        config = group.config
        self.inputs = inputs
        let b = inputs.tokens[0].shape[0], device = group.device
        idx = try DeviceTensor(.i32, [b, config.topK], on: device)
        x = try DeviceTensor(config.dispatchInputType, [b, config.hidden], on: device)
        scales = try inputs.scales.map { try DeviceTensor($0[0].dtype, $0[0].shape, on: device) }
        if let scales, let given = inputs.scales?[0] { try scales.upload(given) }
        w = try DeviceTensor(.f32, [b, config.topK], on: device)
        combined = try DeviceTensor(config.elementType, [b, config.hidden], on: device)
        gradsOut = try DeviceTensor(.f32, [b, config.topK], on: device)
        let ids = try HostTensor(.i32, idx.shape)
        try ids.copy(from: inputs.routing[0])
        try idx.upload(ids)
        try x.upload(inputs.tokens[0])
        try w.upload(inputs.weights[0])
    }

    func dispatch(_ group: NCCLRankGroup, _ handle: GPUStepHandle, slot: Int, direction: PassDirection) throws {
        try group.dispatch(handle, [DispatchInput(tokens: x.ref, topkWeights: w.ref, scales: scales?.ref)], into: [group.slots[slot].dispatchOutput],
                           direction: direction)
    }

    /// The step's combine. The experts write their outputs into the slot, or (`caller`) they
    /// are in a tensor of the caller's, which the group copies from; backward, the weight
    /// gradients go into the slot.
    func combine(_ group: NCCLRankGroup, _ handle: GPUStepHandle, slot: Int, direction: PassDirection, copyingFrom caller: TensorRef? = nil) throws {
        let buffers = group.slots[slot], driver = group.device.driver
        if caller == nil {
            try driver.copy(from: inputs.expertOutputs[0].storage, to: buffers.expertOutputs.devicePointer,
                            byteCount: inputs.expertOutputs[0].byteCount)
        }
        let backward = direction == .backward && config.algorithm == .highThroughput
        if backward, let g = inputs.weightGradients[0], let target = buffers.weightGradients {
            try driver.copy(from: g.storage, to: target.devicePointer, byteCount: g.byteCount)
        }
        let weights: TensorRef? = direction != .forward ? nil : config.layout == .expertMajor ? w.ref : config.isExpertMajorHT ? buffers.receivedWeights : nil
        let input = CombineInput(expertOutputs: caller ?? buffers.expertOutputs, topkWeights: weights, weightGradients: backward ? buffers.weightGradients : nil)
        let output = CombineOutput(tokens: combined.ref, topkWeightGradients: backward ? gradsOut.ref : nil)
        if caller != nil {
            try group.combine(copyingFrom: input, into: output, handle: handle, direction: direction)
        } else {
            try group.combine(handle, [input], into: [output], direction: direction)
        }
    }

    func result(_ group: NCCLRankGroup, _ handle: GPUStepHandle, slot: Int, direction: PassDirection) throws -> StepResult {
        let driver = group.device.driver
        let received = try HostTensor(config.receiveElementType, config.receiveShape)
        try driver.copy(from: group.slots[slot].receivedTokens.devicePointer, to: received.storage,
                        byteCount: received.byteCount)
        let receivedScales = try group.slots[slot].receivedScales.map { try HostTensor($0.dtype, $0.shape) }
        if let receivedScales, let buffer = group.slots[slot].receivedScales {
            try driver.copy(from: buffer.devicePointer, to: receivedScales.storage, byteCount: receivedScales.byteCount)
        }
        let out = try HostTensor(config.elementType, combined.shape)
        try combined.download(into: out)
        var grads: [UInt8]?
        if direction == .backward && config.algorithm == .highThroughput {
            let g = try HostTensor(.f32, gradsOut.shape)
            try gradsOut.download(into: g)
            grads = g.bytes()
        }
        return StepResult(received: received.bytes(), combined: out.bytes(), layout: try group.layoutInfo(handle, rank: 0), weightGradients: grads,
                          scales: receivedScales?.bytes())
    }
}
