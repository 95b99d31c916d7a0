import CExpertParallel
import ExpertParallel
@testable import ExpertParallelC
import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation
import Testing

/// One argument a call has no use for, given: the group's layout, algorithm or FP8 mode, or the
/// call's direction, does not take it. Every backend refuses it (epInvalidArgument naming the
/// argument, "= given; must be NULL: ..."), the host group being the oracle; the same table drives
/// the host suite, the virtual GPU group over the mock driver, and the GPU-gated suite.
struct InapplicableArgument: Sendable, CustomTestStringConvertible {
    enum Call: Sendable, Equatable { case dispatch, combine(PassDirection) }

    /// The arguments the table gives where they do not apply.
    enum Argument: String, Sendable, CaseIterable {
        case receivedTopkIdx, receivedTopkWeights, receivedScales, inputScales, combineWeights, weightGradients, topkWeightGradients

        /// The argument as a collective call names rank 0's: entry 0 of its arrays.
        var collectiveField: String { structField.replacing("inputs.", with: "inputs[0].").replacing("outputs.", with: "outputs[0].") }

        /// The argument as the per-rank calls' structs name it.
        var structField: String {
            switch self {
            case .receivedTopkIdx: "outputs.topkIdx"
            case .receivedTopkWeights: "outputs.topkWeights"
            case .receivedScales: "outputs.scales"
            case .inputScales: "inputs.scales"
            case .combineWeights: "inputs.topkWeights"
            case .weightGradients: "inputs.weightGradients"
            case .topkWeightGradients: "outputs.topkWeightGradients"
            }
        }

        /// The argument as the stacked calls' structs name it.
        var stackedField: String {
            switch self {
            case .receivedTopkIdx: "call.receivedTopkIdx"
            case .receivedTopkWeights: "call.receivedTopkWeights"
            case .receivedScales: "call.receivedScales"
            case .inputScales: "call.scales"
            case .combineWeights: "call.topkWeights"
            case .weightGradients: "call.weightGradients"
            case .topkWeightGradients: "call.topkWeightGradients"
            }
        }
    }

    var name: String
    var config: GroupConfig
    var call: Call
    var argument: Argument
    var testDescription: String { name }

    static let llExpertMajor = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 128, elementType: .bf16, maxTokensPerRank: 3)
    static let llRankMajor = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 128, elementType: .bf16, maxTokensPerRank: 3,
                                         layout: .rankMajor)
    static let htFlat = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 128, elementType: .bf16, maxTokensPerRank: 3)
    static let htPadded = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 128, elementType: .bf16, maxTokensPerRank: 3,
                                      layout: .expertMajorPadded(alignment: 2))
    static let fp8Quantize = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 128, elementType: .bf16, maxTokensPerRank: 3,
                                         fp8: FP8Dispatch(scales: .float32Block128))

    static let cases: [InapplicableArgument] = [
        .init(name: "LL expert-major dispatch: received topkIdx (no routing received)", config: llExpertMajor, call: .dispatch, argument: .receivedTopkIdx),
        .init(name: "LL expert-major dispatch: received topkWeights", config: llExpertMajor, call: .dispatch, argument: .receivedTopkWeights),
        .init(name: "non-FP8 dispatch: received scales", config: llRankMajor, call: .dispatch, argument: .receivedScales),
        .init(name: "non-FP8 dispatch: input scales", config: htFlat, call: .dispatch, argument: .inputScales),
        .init(name: "FP8 quantising dispatch: input scales", config: fp8Quantize, call: .dispatch, argument: .inputScales),
        .init(name: "LL rank-major forward combine: topkWeights", config: llRankMajor, call: .combine(.forward), argument: .combineWeights),
        .init(name: "HT flat forward combine: topkWeights", config: htFlat, call: .combine(.forward), argument: .combineWeights),
        .init(name: "LL expert-major backward combine: topkWeights", config: llExpertMajor, call: .combine(.backward), argument: .combineWeights),
        .init(name: "HT expert-major backward combine: topkWeights", config: htPadded, call: .combine(.backward), argument: .combineWeights),
        .init(name: "HT flat forward combine: weightGradients", config: htFlat, call: .combine(.forward), argument: .weightGradients),
        .init(name: "HT expert-major forward combine: topkWeightGradients", config: htPadded, call: .combine(.forward), argument: .topkWeightGradients),
        .init(name: "LL expert-major backward combine: weightGradients", config: llExpertMajor, call: .combine(.backward), argument: .weightGradients),
        .init(name: "LL rank-major backward combine: topkWeightGradients", config: llRankMajor, call: .combine(.backward), argument: .topkWeightGradients),
    ]

    /// A call's status and this thread's message after it.
    struct Outcome: Sendable, CustomStringConvertible {
        var status: epResult_t
        var message: String
        var description: String { "\(status.rawValue): \(message)" }

        init(_ status: epResult_t) {
            self.status = status
            message = String(cString: cGetLastErrorMessage())
        }
    }

    /// Whether `outcome` is this case's refusal, `field` named.
    func isRefusal(_ outcome: Outcome, field: String) -> Bool {
        // (In C's words: the layout as its epLayout_t, not the Swift API's name.)
        outcome.status == epInvalidArgument && outcome.message.contains("\(field) = given; must be NULL")
            && !["layout expert-major", "layout rank-major", "layout flat"].contains { outcome.message.contains($0) }
    }
}

/// The memory a group's tensors live in: the host's, or a device's (the mock driver's is host
/// memory too). Every buffer lives as long as the memory object.
protocol ArgumentMemory: AnyObject {
    /// -1 (host) or the device ordinal, as `epTensor_t.device` says it.
    var device: Int32 { get }
    /// `bytes` zeroed bytes, `initial` copied in where given.
    func allocate(_ bytes: Int, initial: [UInt8]?) throws -> UnsafeMutableRawPointer?
    /// Copies `bytes` to `address` (memory this object allocated).
    func write(_ bytes: [UInt8], to address: UnsafeMutableRawPointer) throws
}

final class HostArgumentMemory: ArgumentMemory {
    private var buffers: [UnsafeMutableRawPointer] = []
    var device: Int32 { -1 }

    func allocate(_ bytes: Int, initial: [UInt8]?) throws -> UnsafeMutableRawPointer? {
        let p = calloc(max(bytes, 8), 1)!
        buffers.append(p)
        if let initial { initial.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        return p
    }

    func write(_ bytes: [UInt8], to address: UnsafeMutableRawPointer) throws {
        bytes.withUnsafeBytes { address.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }

    deinit { for p in buffers { free(p) } }
}

final class DeviceArgumentMemory: ArgumentMemory {
    let gpu: GPUDevice
    private var tensors: [DeviceTensor] = []
    var device: Int32 { Int32(gpu.ordinal) }

    init(_ gpu: GPUDevice) { self.gpu = gpu }

    func allocate(_ bytes: Int, initial: [UInt8]?) throws -> UnsafeMutableRawPointer? {
        let tensor = try DeviceTensor(.u8, [max(bytes, 8)], on: gpu)
        tensors.append(tensor)
        if let initial {
            var padded = initial + Array(repeating: 0, count: max(bytes, 8) - initial.count)
            try padded.withUnsafeMutableBytes { try tensor.upload(UnsafeRawPointer($0.baseAddress!)) }
        } else {
            try Array(repeating: UInt8(0), count: max(bytes, 8)).withUnsafeBytes { try tensor.upload($0.baseAddress!) }
        }
        return tensor.ref.address
    }

    func write(_ bytes: [UInt8], to address: UnsafeMutableRawPointer) throws {
        try gpu.makeCurrent()
        try gpu.driver.copy(bytes, to: DevicePointer(rawValue: UInt64(UInt(bitPattern: address))))
    }
}

/// The C calls of one group on its memory: every rank's valid arguments for a step (B tokens a
/// rank, each row to two distinct experts), and the case's argument added where it applies not.
final class ArgumentParityFixture {
    let config: GroupConfig
    let group: epGroup_t
    let memory: ArgumentMemory
    let tokens = 2
    private var descriptors: [UnsafeMutablePointer<epTensor_t>] = []
    /// Every argument's buffer, by name: one per name holding every rank's part, `stride` bytes
    /// apart (so the stacked calls describe the same tensors as the per-rank structs).
    private var buffers: [String: (base: UnsafeMutableRawPointer, stride: Int)] = [:]

    init(_ config: GroupConfig, group: epGroup_t, memory: ArgumentMemory) {
        self.config = config
        self.group = group
        self.memory = memory
    }

    deinit {
        _ = cGroupDestroy(group)
        for p in descriptors { p.deallocate() }
    }

    /// A host group of `config` made through the C ABI.
    static func host(_ config: GroupConfig) throws -> ArgumentParityFixture {
        var c = epGroupConfig_t(config)
        var group: epGroup_t?
        let status = cGroupCreate(&c, nil, &group)
        guard status == epSuccess, let group else { throw ArgumentFixtureError.create(String(cString: cGetLastErrorMessage())) }
        return ArgumentParityFixture(config, group: group, memory: HostArgumentMemory())
    }

    /// A virtual GPU group of `config` on `device` (the mock driver's, or a GPU's).
    static func virtualGPU(_ config: GroupConfig, device: GPUDevice) throws -> ArgumentParityFixture {
        let object = GroupObject(config: config, backend: try GPUBackend(VirtualGPUGroup(config, device: device)))
        return ArgumentParityFixture(config, group: groupRegistry.add(object), memory: DeviceArgumentMemory(device))
    }

    /// Rank `rank`'s tensor `name` (its buffer made on first use, for every rank; a later use
    /// must not be larger), `initial` its bytes.
    func tensor(_ name: String, _ rank: Int, _ dtype: DataType, _ shape: [Int], initial: [UInt8]? = nil) throws -> UnsafePointer<epTensor_t> {
        let bytes = shape.reduce(1, *) * dtype.byteSize
        if buffers[name] == nil {
            let stride = max(8, (bytes + 7) / 8 * 8)
            buffers[name] = (try memory.allocate(stride * config.ranks, initial: nil)!, stride)
        }
        let (base, stride) = buffers[name]!
        precondition(bytes <= stride, "\(name): \(bytes) bytes in a part of \(stride)")
        let address = base + rank * stride
        if let initial { try memory.write(initial, to: address) }
        let p = UnsafeMutablePointer<epTensor_t>.allocate(capacity: 1)
        p.initialize(to: TensorDescriptor.describe(
            TensorRef(address: address, dtype: dtype, shape: shape), location: memory.device < 0 ? .host : .device(Int(memory.device))))
        descriptors.append(p)
        return UnsafePointer(p)
    }

    /// Rank r's routing: token t to experts (t + r) % E and (t + r + 1) % E, and so on for K.
    func routing(_ rank: Int) throws -> UnsafePointer<epTensor_t> {
        var ids: [Int32] = []
        for t in 0..<tokens { for c in 0..<config.topK { ids.append(Int32((t + rank + c) % config.experts)) } }
        return try tensor("idx", rank, .i32, [tokens, config.topK], initial: ids.withUnsafeBytes { Array($0) })
    }

    var weighsCombine: Bool { config.layout == .expertMajor || config.isExpertMajorHT }

    // MARK: the per-rank structs (one rank's, as epDispatch and the *All calls take them)

    func updateInputs(_ rank: Int) throws -> epUpdateInputs_t {
        var u = epUpdateInputs_t()
        u.structSize = epUpdateInputs_t.abiSize
        u.topkIdx = try routing(rank)
        return u
    }

    func dispatchArguments(_ rank: Int, giving extra: InapplicableArgument.Argument? = nil) throws -> (epDispatchInputs_t, epDispatchOutputs_t) {
        let k = config.topK, b = tokens
        var i = epDispatchInputs_t()
        i.structSize = epDispatchInputs_t.abiSize
        i.tokens = try tensor("x", rank, config.dispatchInputType, [b, config.hidden])
        i.topkWeights = try tensor("w", rank, .f32, [b, k])
        if config.fp8?.source == .passThrough || extra == .inputScales {
            i.scales = try tensor("scales", rank, config.fp8?.scaleType ?? .f32, [b, config.fp8Format?.scaleWordsPerRow ?? 1])
        }
        var o = epDispatchOutputs_t()
        o.structSize = epDispatchOutputs_t.abiSize
        o.tokens = try tensor("recv", rank, config.receiveElementType, config.receiveShape)
        let routing = config.receiveRoutingShape ?? [b, k]
        if config.receiveRoutingShape != nil || extra == .receivedTopkIdx { o.topkIdx = try tensor("recvIdx", rank, .i32, routing) }
        if config.receiveRoutingShape != nil || extra == .receivedTopkWeights { o.topkWeights = try tensor("recvW", rank, .f32, routing) }
        if let shape = config.receiveScalesShape {
            o.scales = try tensor("recvScales", rank, config.fp8!.scaleType, shape)
        } else if extra == .receivedScales {
            o.scales = try tensor("recvScales", rank, .f32, [config.receiveShape[0], 1])
        }
        return (i, o)
    }

    func combineArguments(_ rank: Int, _ direction: PassDirection, giving extra: InapplicableArgument.Argument? = nil) throws
        -> (epCombineInputs_t, epCombineOutputs_t)
    {
        let k = config.topK, b = tokens
        let weighs = direction == .forward && weighsCombine, gradients = direction == .backward && config.algorithm == .highThroughput
        var i = epCombineInputs_t()
        i.structSize = epCombineInputs_t.abiSize
        i.expertOutputs = try tensor("y", rank, config.elementType, config.receiveShape)
        if weighs || extra == .combineWeights {
            i.topkWeights = config.isExpertMajorHT ? try tensor("recvW", rank, .f32, config.receiveRoutingShape!) : try tensor("w", rank, .f32, [b, k])
        }
        if gradients || extra == .weightGradients {
            i.weightGradients = try tensor("gradIn", rank, .f32, config.receiveRoutingShape ?? [b, k])
        }
        var o = epCombineOutputs_t()
        o.structSize = epCombineOutputs_t.abiSize
        o.tokens = try tensor("out", rank, config.elementType, [b, config.hidden])
        if gradients || extra == .topkWeightGradients { o.topkWeightGradients = try tensor("gradOut", rank, .f32, [b, k]) }
        return (i, o)
    }

    // MARK: the stacked structs (every rank's parts packed: each name's buffers are one per rank,
    // so the stacked calls get rank 0's address and the stride to rank 1's)

    private func stacked(_ name: String, _ dtype: DataType) -> epStacked_t {
        guard let (base, stride) = buffers[name] else { return epStacked_t() }
        return epStacked_t(data: base, dtype: ABIEnum.dataType(dtype), device: memory.device, rankStride: Int64(stride))
    }

    /// A stacked dispatch of the step's routing (the update's own call), with `extra` given.
    func stackedDispatch(giving extra: InapplicableArgument.Argument? = nil) throws -> epStackedDispatch_t {
        // Every rank's tensors, made through the per-rank arguments (the same buffers).
        for r in 0..<config.ranks {
            _ = try routing(r)
            _ = try dispatchArguments(r, giving: extra)
        }
        var c = epStackedDispatch_t()
        c.structSize = epStackedDispatch_t.abiSize
        c.tokens = Int64(tokens)
        c.topkIdx = stacked("idx", .i32)
        c.inputTokens = stacked("x", config.dispatchInputType)
        c.topkWeights = stacked("w", .f32)
        c.scales = stacked("scales", config.fp8?.scaleType ?? .f32)
        c.receivedTokens = stacked("recv", config.receiveElementType)
        c.receivedTopkIdx = stacked("recvIdx", .i32)
        c.receivedTopkWeights = stacked("recvW", .f32)
        c.receivedScales = stacked("recvScales", config.fp8?.scaleType ?? .f32)
        return c
    }

    func stackedCombine(_ direction: PassDirection, giving extra: InapplicableArgument.Argument? = nil) throws -> epStackedCombine_t {
        for r in 0..<config.ranks { _ = try combineArguments(r, direction, giving: extra) }
        var c = epStackedCombine_t()
        c.structSize = epStackedCombine_t.abiSize
        c.direction = direction == .forward ? epForward : epBackward
        c.expertOutputs = stacked("y", config.elementType)
        let weighs = direction == .forward && weighsCombine
        if weighs || extra == .combineWeights { c.topkWeights = config.isExpertMajorHT ? stacked("recvW", .f32) : stacked("w", .f32) }
        c.weightGradients = stacked("gradIn", .f32)
        c.combinedTokens = stacked("out", config.elementType)
        c.topkWeightGradients = stacked("gradOut", .f32)
        return c
    }

    // MARK: the calls

    func updateAll() throws -> InapplicableArgument.Outcome {
        let inputs = try (0..<config.ranks).map(updateInputs)
        return InapplicableArgument.Outcome(cGroupUpdateAll(group, inputs, nil, nil))
    }

    func dispatchAll(giving extra: InapplicableArgument.Argument? = nil, phase: epCallPhase_t = epPhaseWhole) throws -> InapplicableArgument.Outcome {
        let arguments = try (0..<config.ranks).map { try dispatchArguments($0, giving: extra) }
        var config = epDispatchConfig_t()
        config.structSize = epDispatchConfig_t.abiSize
        config.phase = phase
        return InapplicableArgument.Outcome(cGroupDispatchAll(group, arguments.map(\.0), arguments.map(\.1), &config, nil))
    }

    func combineAll(_ direction: PassDirection, giving extra: InapplicableArgument.Argument? = nil, phase: epCallPhase_t = epPhaseWhole) throws
        -> InapplicableArgument.Outcome
    {
        let arguments = try (0..<config.ranks).map { try combineArguments($0, direction, giving: extra) }
        var config = epCombineConfig_t()
        config.structSize = epCombineConfig_t.abiSize
        config.direction = direction == .forward ? epForward : epBackward
        config.phase = phase
        return InapplicableArgument.Outcome(cGroupCombineAll(group, arguments.map(\.0), arguments.map(\.1), &config, nil))
    }

    /// The case's call, collective, with its argument given; then the same call without it, which
    /// must succeed (the refused call changed nothing, and the fixture's arguments are valid).
    func collective(_ c: InapplicableArgument) throws -> (refused: InapplicableArgument.Outcome, retried: InapplicableArgument.Outcome) {
        let update = try updateAll()
        #expect(update.status == epSuccess, "update: \(update)")
        switch c.call {
        case .dispatch:
            return (try dispatchAll(giving: c.argument), try dispatchAll())
        case .combine(let direction):
            let dispatch = try dispatchAll()
            #expect(dispatch.status == epSuccess, "dispatch: \(dispatch)")
            return (try combineAll(direction, giving: c.argument), try combineAll(direction))
        }
    }

    /// The case's call, stacked, then the same call without the case's argument.
    func stacked(_ c: InapplicableArgument) throws -> (refused: InapplicableArgument.Outcome, retried: InapplicableArgument.Outcome) {
        switch c.call {
        case .dispatch:
            var bad = try stackedDispatch(giving: c.argument), good = try stackedDispatch()
            // (The bad call's buffer stays in the table: the good call leaves out what the group does not take.)
            good.receivedTopkIdx = config.receiveRoutingShape != nil ? good.receivedTopkIdx : epStacked_t()
            good.receivedTopkWeights = config.receiveRoutingShape != nil ? good.receivedTopkWeights : epStacked_t()
            good.receivedScales = config.receiveScalesShape != nil ? good.receivedScales : epStacked_t()
            good.scales = config.fp8?.source == .passThrough ? good.scales : epStacked_t()
            return (InapplicableArgument.Outcome(cGroupDispatchStacked(group, &bad, nil)), InapplicableArgument.Outcome(cGroupDispatchStacked(group, &good, nil)))
        case .combine(let direction):
            let update = try updateAll(), dispatch = try dispatchAll()
            #expect(update.status == epSuccess && dispatch.status == epSuccess, "\(update), \(dispatch)")
            var bad = try stackedCombine(direction, giving: c.argument), good = try stackedCombine(direction)
            let gradients = direction == .backward && config.algorithm == .highThroughput
            if !gradients {
                good.weightGradients = epStacked_t()
                good.topkWeightGradients = epStacked_t()
            }
            return (InapplicableArgument.Outcome(cGroupCombineStacked(group, &bad, nil)), InapplicableArgument.Outcome(cGroupCombineStacked(group, &good, nil)))
        }
    }
}

enum ArgumentFixtureError: Error { case create(String) }

extension epGroupConfig_t {
    /// `config` as the C struct.
    init(_ config: GroupConfig) {
        self.init()
        structSize = epGroupConfig_t.abiSize
        algorithm = config.algorithm == .lowLatency ? epAlgorithmLowLatency : epAlgorithmHighThroughput
        switch config.layout {
        case .expertMajor: layout = epLayoutExpertMajor
        case .rankMajor: layout = epLayoutRankMajor
        case .flat: layout = epLayoutFlat
        case .expertMajorPadded(let a):
            layout = epLayoutExpertMajorPadded
            alignment = Int32(a)
        }
        ranks = Int32(config.ranks)
        experts = Int32(config.experts)
        topK = Int32(config.topK)
        hidden = Int64(config.hidden)
        elementType = ABIEnum.dataType(config.elementType)
        maxTokensPerRank = Int64(config.maxTokensPerRank)
        if let fp8 = config.fp8 {
            switch fp8.scales {
            case .float32Block128: fp8Scales = epFP8Float32Block128
            case .ue8m0Block128: fp8Scales = epFP8UE8M0Block128
            case .e8m0Block32: fp8Scales = epFP8E8M0Block32
            }
            fp8Source = fp8.source == .passThrough ? epFP8PassThrough : epFP8Quantize
        }
    }
}
