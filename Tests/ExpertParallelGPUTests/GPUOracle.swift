import ExpertParallel
import ExpertParallelGPU
import Foundation
import Testing

/// GPU tests run only where `EP_GPU_TESTS=1` (the GPU machine); CI has no GPU.
let gpuTestsEnabled = ProcessInfo.processInfo.environment["EP_GPU_TESTS"] == "1"

/// The device, opened once for all GPU tests.
let sharedDevice: GPUDevice? = try? GPUDevice()

/// What a test that reads ptxas's report says when there is none: NVRTC's ptxas stage came from
/// CUDA's compute cache (~/.nv/ComputeCache), which serves a second compile of the same kernel
/// with an empty report (seen on the H200); `CUDA_CACHE_DISABLE=1` (scripts/test, device-verify)
/// turns it off.
let noReportHint = "no ptxas report: a second compile served from CUDA's compute cache? Run with CUDA_CACHE_DISABLE=1"

/// Per-rank launches (one launch per rank, whose ranks wait for each other on the GPU) need the
/// process's GPU work to themselves: another thread's launches can fill the SMs a rank's kernel
/// waits for, and a driver call that waits for the GPU between a call's launches (a free by another
/// library; this library's allocations and frees take turns with them, LaunchGate.swift) holds
/// back its last ranks while their peers wait out the timeout. So the GPU suite, whose tests run
/// in parallel, runs every step as one launch, and a second pass, `EP_PER_RANK_TESTS=1` with
/// `--no-parallel` (scripts/device-verify), runs the per-rank steps alone (ConcurrentPerRankGroupsTests
/// there: two groups stepping per rank at once, and frees beside).
let perRankTestsEnabled = ProcessInfo.processInfo.environment["EP_PER_RANK_TESTS"] == "1"

/// How a step a test would launch `wanted` runs in this pass: the parallel pass launches every
/// step once for all ranks; the per-rank pass runs only the per-rank steps (nil: skip this one).
func launchMode(_ wanted: LaunchMode) -> LaunchMode? {
    perRankTestsEnabled ? (wanted == .perRank ? .perRank : nil) : .single
}

/// The launch modes a test that takes both runs with in this pass.
let launchModesOfThisPass: [LaunchMode] = perRankTestsEnabled ? [.perRank] : [.single]

/// One step's inputs for every rank, random but reproducible, on the host.
struct StepInputs {
    var routing: [[Int32]]
    var tokens: [HostTensor]
    var weights: [HostTensor]
    var expertOutputs: [HostTensor]
    /// HT backward: the weight gradient of every received row or slot, per rank.
    var weightGradients: [HostTensor?]
    /// FP8 pass-through: each rank's `[B, scale words]` scales of its e4m3 `tokens`.
    var scales: [HostTensor]? = nil

    init(config: GroupConfig, tokens counts: [Int], seed: UInt64, minusOneRate: Float = 0.1, oneExpert: Int? = nil, skew: Double = 0) throws {
        var random = RandomRouting(seed: seed)
        routing = try counts.map { b in
            var ids = try random.experts(tokens: b, topK: config.topK, experts: config.experts, skew: skew)
            for i in ids.indices where random.unit() < minusOneRate { ids[i] = -1 }
            if let oneExpert { for t in 0..<b { ids[t * config.topK] = Int32(oneExpert); for c in 1..<config.topK { ids[t * config.topK + c] = -1 } } }
            return ids
        }
        tokens = try counts.map { b in
            let x = try HostTensor(config.elementType, [b, config.hidden])
            try x.copy(from: random.payload(b * config.hidden, config.elementType))
            return x
        }
        weights = try counts.map { b in
            let w = try HostTensor(.f32, [b, config.topK])
            try w.copy(from: random.weights(b * config.topK))
            return w
        }
        expertOutputs = try counts.map { _ in
            let y = try HostTensor(config.elementType, config.receiveShape)
            try y.copy(from: random.payload(y.elementCount, config.elementType))
            return y
        }
        weightGradients = try counts.map { _ in
            guard config.algorithm == .highThroughput, let shape = config.receiveRoutingShape else { return nil }
            let g = try HostTensor(.f32, shape)
            try g.copy(from: random.weights(g.elementCount).map { $0 - 0.5 })
            return g
        }
    }
}

extension GroupConfig {
    /// A config for `layout`, with the algorithm that layout belongs to.
    static func forLayout(_ layout: Layout, ranks: Int, experts: Int, topK: Int, hidden: Int, elementType: DataType,
                          maxTokensPerRank: Int, maxReceivedTokensPerRank: Int? = nil, timeout: Duration = .seconds(10)) -> GroupConfig {
        let algorithm: Algorithm = layout == .expertMajor || layout == .rankMajor ? .lowLatency : .highThroughput
        return GroupConfig(algorithm: algorithm, ranks: ranks, experts: experts, topK: topK, hidden: hidden, elementType: elementType,
                           maxTokensPerRank: maxTokensPerRank, maxReceivedTokensPerRank: maxReceivedTokensPerRank, layout: layout,
                           timeout: timeout)
    }

    /// Backward HT combines carry weight gradients.
    func carriesWeightGradients(_ direction: PassDirection) -> Bool { direction == .backward && algorithm == .highThroughput }
}

/// What a step produced on one rank, as host bytes.
struct StepResult: Equatable {
    var received: [UInt8]
    var receivedIdx: [UInt8]?
    var receivedWeights: [UInt8]?
    var combined: [UInt8]
    var layout: LayoutInfo
    var weightGradients: [UInt8]? = nil
    /// FP8 groups: the received rows' scale words.
    var scales: [UInt8]? = nil
}

/// Runs the step on the CPU oracle. Outputs start as the byte `poison`.
func oracleStep(_ config: GroupConfig, _ inputs: StepInputs, direction: PassDirection = .forward, masked: [Int] = []) throws -> [StepResult?] {
    let group = try HostGroup(config)
    for rank in masked { try group[0].deactivate(rank: rank) }
    let active = (0..<config.ranks).filter { !masked.contains($0) }
    let results = group.run(ranks: active) { rank throws(EPError) -> StepResult in
        let r = rank.rank
        let idx = try HostTensor(.i32, [inputs.tokens[r].shape[0], config.topK])
        try idx.copy(from: inputs.routing[r])
        let received = try HostTensor(config.receiveElementType, config.receiveShape)
        let receivedIdx = try config.receiveRoutingShape.map { shape throws(EPError) in try HostTensor(.i32, shape) }
        let receivedWeights = try config.receiveRoutingShape.map { shape throws(EPError) in try HostTensor(.f32, shape) }
        let receivedScales = try config.receiveScalesShape.map { shape throws(EPError) in try HostTensor(config.fp8!.scaleType, shape) }
        let combined = try HostTensor(config.elementType, inputs.tokens[r].shape)
        for t in [received, combined] + [receivedIdx, receivedWeights, receivedScales].compactMap({ $0 }) { t.fill(byte: 0xA5) }
        let grads = config.carriesWeightGradients(direction) ? try HostTensor(.f32, [inputs.tokens[r].shape[0], config.topK]) : nil
        grads?.fill(byte: 0xA5)
        let handle = try rank.makeHandle()
        try rank.update(handle, topkIdx: idx.ref)
        let info = try rank.dispatch(handle, DispatchInput(tokens: inputs.tokens[r].ref, topkWeights: inputs.weights[r].ref, scales: inputs.scales?[r].ref),
                                     into: DispatchOutput(tokens: received.ref, topkIdx: receivedIdx?.ref, topkWeights: receivedWeights?.ref,
                                                          scales: receivedScales?.ref),
                                     direction: direction)
        // Only a forward combine of an expert-major layout takes weights (CallShapes refuses the rest).
        let weights: TensorRef? = direction != .forward ? nil : config.layout == .expertMajor ? inputs.weights[r].ref
            : config.isExpertMajorHT ? receivedWeights!.ref : nil
        try rank.combine(handle, CombineInput(expertOutputs: inputs.expertOutputs[r].ref, topkWeights: weights,
                                              weightGradients: config.carriesWeightGradients(direction) ? inputs.weightGradients[r]!.ref : nil),
                         into: CombineOutput(tokens: combined.ref, topkWeightGradients: grads?.ref), direction: direction)
        return StepResult(received: received.bytes(), receivedIdx: receivedIdx?.bytes(), receivedWeights: receivedWeights?.bytes(),
                          combined: combined.bytes(), layout: info, weightGradients: grads?.bytes(), scales: receivedScales?.bytes())
    }
    var out = [StepResult?](repeating: nil, count: config.ranks)
    for (i, r) in active.enumerated() { out[r] = try results[i].get() }
    return out
}

/// Device buffers for one step of a virtual GPU group.
final class GPUStep: @unchecked Sendable {
    let config: GroupConfig
    let device: GPUDevice
    var idx: [DeviceTensor] = [], x: [DeviceTensor] = [], w: [DeviceTensor] = [], y: [DeviceTensor] = []
    var received: [DeviceTensor] = [], receivedIdx: [DeviceTensor?] = [], receivedWeights: [DeviceTensor?] = [], combined: [DeviceTensor] = []
    var gradsIn: [DeviceTensor?] = [], gradsOut: [DeviceTensor?] = []
    /// FP8: the pass-through input scales and the received scales, per rank.
    var scalesIn: [DeviceTensor?] = [], receivedScales: [DeviceTensor?] = []

    init(_ config: GroupConfig, _ device: GPUDevice, tokens: [Int]) throws {
        self.config = config
        self.device = device
        for b in tokens {
            idx.append(try DeviceTensor(.i32, [b, config.topK], on: device))
            x.append(try DeviceTensor(config.dispatchInputType, [b, config.hidden], on: device))
            w.append(try DeviceTensor(.f32, [b, config.topK], on: device))
            y.append(try DeviceTensor(config.elementType, config.receiveShape, on: device))
            received.append(try DeviceTensor(config.receiveElementType, config.receiveShape, on: device))
            let words = config.fp8Format?.scaleWordsPerRow ?? 0
            scalesIn.append(config.fp8?.source == .passThrough ? try DeviceTensor(config.fp8!.scaleType, [b, words], on: device) : nil)
            receivedScales.append(try config.receiveScalesShape.map { try DeviceTensor(config.fp8!.scaleType, $0, on: device) })
            receivedIdx.append(try config.receiveRoutingShape.map { try DeviceTensor(.i32, $0, on: device) })
            receivedWeights.append(try config.receiveRoutingShape.map { try DeviceTensor(.f32, $0, on: device) })
            combined.append(try DeviceTensor(config.elementType, [b, config.hidden], on: device))
            let ht = config.algorithm == .highThroughput
            gradsIn.append(ht ? try DeviceTensor(.f32, config.receiveRoutingShape!, on: device) : nil)
            gradsOut.append(ht ? try DeviceTensor(.f32, [b, config.topK], on: device) : nil)
        }
    }

    func upload(_ inputs: StepInputs) throws {
        for r in 0..<config.ranks {
            let ids = try HostTensor(.i32, idx[r].shape)
            try ids.copy(from: inputs.routing[r])
            try idx[r].upload(ids)
            try x[r].upload(inputs.tokens[r])
            try w[r].upload(inputs.weights[r])
            try y[r].upload(inputs.expertOutputs[r])
            if let g = inputs.weightGradients[r] { try gradsIn[r]!.upload(g) }
            if let scales = inputs.scales { try scalesIn[r]!.upload(scales[r]) }
        }
    }

    func poison() throws {
        for t in received + combined + (receivedIdx + receivedWeights + gradsOut + receivedScales).compactMap({ $0 }) { try t.fill(byte: 0xA5) }
    }

    /// One step: update, dispatch, combine. `fused`: update and dispatch in one call (LL: one
    /// launch of the fused kernel where the group fuses them).
    func enqueue(
        _ group: VirtualGPUGroup, direction: PassDirection = .forward, mode: LaunchMode = .single, phase: CallPhase = .whole, fused: Bool = false
    ) throws {
        let sources = (0..<config.ranks).map { DispatchInput(tokens: x[$0].ref, topkWeights: w[$0].ref, scales: scalesIn[$0]?.ref) }
        let targets = (0..<config.ranks).map {
            DispatchOutput(tokens: received[$0].ref, topkIdx: receivedIdx[$0]?.ref, topkWeights: receivedWeights[$0]?.ref, scales: receivedScales[$0]?.ref)
        }
        if fused {
            try group.dispatch(topkIdx: idx.map(\.ref), sources, into: targets, phase: phase, mode: mode)
        } else {
            try group.update(topkIdx: idx.map(\.ref), mode: mode)
            try group.dispatch(sources, into: targets, phase: phase, mode: mode)
        }
        if phase == .sendOnly { try group.complete() }
        let grads = config.carriesWeightGradients(direction)
        let inputs = (0..<config.ranks).map { r in
            CombineInput(
                expertOutputs: y[r].ref,
                topkWeights: direction != .forward ? nil : config.layout == .expertMajor ? w[r].ref
                    : config.isExpertMajorHT ? receivedWeights[r]!.ref : nil,
                weightGradients: grads ? gradsIn[r]!.ref : nil)
        }
        try group.combine(inputs, into: (0..<config.ranks).map { CombineOutput(tokens: combined[$0].ref, topkWeightGradients: grads ? gradsOut[$0]!.ref : nil) },
                          direction: direction, phase: phase, mode: mode)
        if phase == .sendOnly { try group.complete() }
    }

    /// Weight gradients come back only where the oracle has them (HT backward); `direction` says.
    func results(_ group: VirtualGPUGroup, direction: PassDirection = .forward) throws -> [StepResult] {
        try group.checkStatus()
        return try (0..<config.ranks).map { r in
            func bytes(_ t: DeviceTensor) throws -> [UInt8] {
                let h = try HostTensor(t.dtype, t.shape)
                try t.download(into: h)
                return h.bytes()
            }
            return StepResult(received: try bytes(received[r]), receivedIdx: try receivedIdx[r].map(bytes),
                              receivedWeights: try receivedWeights[r].map(bytes), combined: try bytes(combined[r]),
                              layout: try group.layoutInfo(rank: r),
                              weightGradients: config.carriesWeightGradients(direction) ? try gradsOut[r].map(bytes) : nil,
                              scales: try receivedScales[r].map(bytes))
        }
    }
}

/// Compares the GPU's step with the oracle's, rank by rank, naming the first difference.
func expectMatch(_ gpu: [StepResult], _ cpu: [StepResult?], _ label: String, sourceLocation: SourceLocation = #_sourceLocation) {
    for (r, expected) in cpu.enumerated() {
        guard let expected else { continue }
        let got = gpu[r]
        #expect(got.layout.expertCounters == expected.layout.expertCounters, "\(label) rank \(r): expert counters", sourceLocation: sourceLocation)
        #expect(got.layout.sourceRankCounters == expected.layout.sourceRankCounters, "\(label) rank \(r): source counters", sourceLocation: sourceLocation)
        #expect(got.layout.expertSourceCounters == expected.layout.expertSourceCounters, "\(label) rank \(r): expert-source counters", sourceLocation: sourceLocation)
        #expect(got.layout.receivedTotal == expected.layout.receivedTotal, "\(label) rank \(r): received total", sourceLocation: sourceLocation)
        expectSameBytes(got.received, expected.received, "\(label) rank \(r): dispatched rows", sourceLocation: sourceLocation)
        expectSameBytes(got.receivedIdx, expected.receivedIdx, "\(label) rank \(r): received idx", sourceLocation: sourceLocation)
        expectSameBytes(got.receivedWeights, expected.receivedWeights, "\(label) rank \(r): received weights", sourceLocation: sourceLocation)
        #expect(got.layout.expertOffsets == expected.layout.expertOffsets, "\(label) rank \(r): expert offsets", sourceLocation: sourceLocation)
        expectSameBytes(got.scales, expected.scales, "\(label) rank \(r): received scales", sourceLocation: sourceLocation)
        expectSameBytes(got.weightGradients, expected.weightGradients, "\(label) rank \(r): weight gradients", sourceLocation: sourceLocation)
        expectSameBytes(got.combined, expected.combined, "\(label) rank \(r): combined rows", sourceLocation: sourceLocation)
    }
}

/// Byte arrays compared without `#expect`'s expansion of `==`: on a mismatch Swift Testing diffs
/// the two collections, in time quadratic in their length (80,000 bytes took 22 s on a 2-core
/// VM; one rank's 800 KB receive buffer would take most of an hour), so a failing oracle test
/// looked like a hang (ConcurrentPerRankGroupsTests). This records the sizes, the first
/// differing byte and how many differ instead.
func expectSameBytes<C: Collection>(_ got: C?, _ expected: C?, _ what: @autoclosure () -> String,
                                    sourceLocation: SourceLocation = #_sourceLocation) where C.Element == UInt8 {
    switch (got, expected) {
    case (nil, nil):
        return
    case let (got?, expected?):
        // Arrays compare at memcmp speed even in debug builds (generic elementsEqual: ~0.1 s per MB).
        let a = Array(got), b = Array(expected)
        if a == b { return }
        let differing = zip(a, b).reduce(0) { $0 + ($1.0 != $1.1 ? 1 : 0) }
        Issue.record("\(what()) differ: \(a.count) bytes against \(b.count) expected, first difference at byte \(firstDifference(a, b)), \(differing) bytes differ",
                     sourceLocation: sourceLocation)
    default:
        Issue.record("\(what()): \(got == nil ? "none" : "some") where the oracle has \(expected == nil ? "none" : "some")", sourceLocation: sourceLocation)
    }
}

func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> Int {
    zip(a, b).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? (a.count == b.count ? -1 : min(a.count, b.count))
}
