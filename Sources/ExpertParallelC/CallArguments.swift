import CExpertParallel
import ExpertParallel
import ExpertParallelGPU

/// The call structs of one rank, converted to the core's types. `name` is the argument's name in
/// error messages, such as "inputs[2]"; `cache` (a group's collective calls): where the
/// descriptors of rank `rank` were last converted (DescriptorCache.swift).
extension DispatchInput {
    init(_ c: epDispatchInputs_t, _ name: @autoclosure () -> String, cache: DescriptorCache? = nil, rank: Int = 0) throws(EPError) {
        self.init(tokens: try DescriptorCache.tensor(c.tokens, in: cache, rank, .dispatchTokens, "\(name()).tokens"),
                  topkWeights: try DescriptorCache.optionalTensor(c.topkWeights, in: cache, rank, .dispatchWeights, "\(name()).topkWeights"),
                  scales: try DescriptorCache.optionalTensor(c.scales, in: cache, rank, .dispatchScales, "\(name()).scales"))
    }
}

extension DispatchOutput {
    init(_ c: epDispatchOutputs_t, _ name: @autoclosure () -> String, cache: DescriptorCache? = nil, rank: Int = 0) throws(EPError) {
        self.init(tokens: try DescriptorCache.tensor(c.tokens, in: cache, rank, .receivedTokens, "\(name()).tokens"),
                  topkIdx: try DescriptorCache.optionalTensor(c.topkIdx, in: cache, rank, .receivedTopkIdx, "\(name()).topkIdx"),
                  topkWeights: try DescriptorCache.optionalTensor(c.topkWeights, in: cache, rank, .receivedWeights, "\(name()).topkWeights"),
                  expertCounts: try DescriptorCache.optionalTensor(c.expertCounts, in: cache, rank, .expertCounts, "\(name()).expertCounts"),
                  expertSourceCounts: try DescriptorCache.optionalTensor(
                      c.expertSourceCounts, in: cache, rank, .expertSourceCounts, "\(name()).expertSourceCounts"),
                  scales: try DescriptorCache.optionalTensor(c.scales, in: cache, rank, .receivedScales, "\(name()).scales"))
    }
}

extension CombineInput {
    init(_ c: epCombineInputs_t, _ name: @autoclosure () -> String, cache: DescriptorCache? = nil, rank: Int = 0) throws(EPError) {
        self.init(expertOutputs: try DescriptorCache.tensor(c.expertOutputs, in: cache, rank, .expertOutputs, "\(name()).expertOutputs"),
                  topkWeights: try DescriptorCache.optionalTensor(c.topkWeights, in: cache, rank, .combineWeights, "\(name()).topkWeights"),
                  weightGradients: try DescriptorCache.optionalTensor(
                      c.weightGradients, in: cache, rank, .weightGradients, "\(name()).weightGradients"))
    }
}

extension CombineOutput {
    init(_ c: epCombineOutputs_t, _ name: @autoclosure () -> String, cache: DescriptorCache? = nil, rank: Int = 0) throws(EPError) {
        self.init(tokens: try DescriptorCache.tensor(c.tokens, in: cache, rank, .combinedTokens, "\(name()).tokens"),
                  topkWeightGradients: try DescriptorCache.optionalTensor(
                      c.topkWeightGradients, in: cache, rank, .weightGradientsOut, "\(name()).topkWeightGradients"))
    }
}

/// What a collective call passes for a rank whose arguments it does not read (a host rank
/// masked inactive): the backend ignores it.
extension TensorRef {
    static var absent: TensorRef { TensorRef(address: nil, dtype: .f32, shape: [0]) }
}

extension DispatchInput { static var absent: DispatchInput { DispatchInput(tokens: .absent, topkWeights: nil) } }
extension DispatchOutput { static var absent: DispatchOutput { DispatchOutput(tokens: .absent, topkIdx: nil, topkWeights: nil) } }
extension CombineInput { static var absent: CombineInput { CombineInput(expertOutputs: .absent, topkWeights: nil, weightGradients: nil) } }
extension CombineOutput { static var absent: CombineOutput { CombineOutput(tokens: .absent, topkWeightGradients: nil) } }

/// A call's config struct (NULL: defaults).
struct CallSettings {
    var direction: PassDirection = .forward
    var mode: LaunchMode = .single
    var phase: CallPhase = .whole
    /// The step the config names (v3); nil: the group's own.
    var step: StepObject?

    /// The defaults (a NULL config).
    init() {}

    init(_ c: UnsafePointer<epUpdateConfig_t>?, group: GroupObject) throws(EPError) {
        if let c = try epUpdateConfig_t.readOptional(c, "config") {
            mode = try ABIEnum.launchMode(c.launchMode, "config.launchMode")
            step = try Self.step(c.step, group)
        }
    }

    init(_ c: UnsafePointer<epDispatchConfig_t>?, group: GroupObject) throws(EPError) {
        if let c = try epDispatchConfig_t.readOptional(c, "config") {
            direction = try ABIEnum.direction(c.direction, "config.direction")
            mode = try ABIEnum.launchMode(c.launchMode, "config.launchMode")
            phase = try ABIEnum.phase(c.phase, "config.phase")
            step = try Self.step(c.step, group)
        }
    }

    init(_ c: UnsafePointer<epCombineConfig_t>?, group: GroupObject) throws(EPError) {
        if let c = try epCombineConfig_t.readOptional(c, "config") {
            direction = try ABIEnum.direction(c.direction, "config.direction")
            mode = try ABIEnum.launchMode(c.launchMode, "config.launchMode")
            phase = try ABIEnum.phase(c.phase, "config.phase")
            step = try Self.step(c.step, group)
        }
    }

    /// A stacked call's settings (its fields are in the call struct itself).
    init(direction: epPassDirection_t, mode: epLaunchMode_t, phase: epCallPhase_t, step: OpaquePointer?, group: GroupObject) throws(EPError) {
        self.direction = try ABIEnum.direction(direction, "call.direction")
        self.mode = try ABIEnum.launchMode(mode, "call.launchMode")
        self.phase = try ABIEnum.phase(phase, "call.phase")
        self.step = try Self.step(step, group, "call.step")
    }

    /// The step object a config names, checked to be one of `group`'s (a step of another group
    /// holds that group's routing and memory).
    static func step(_ pointer: OpaquePointer?, _ group: GroupObject, _ name: String = "config.step") throws(EPError) -> StepObject? {
        guard let pointer else { return nil }
        let step = try stepRegistry.object(pointer, name)
        guard step.group === group else {
            throw .invalidArgument(field: name, value: "\(pointer)", requirement: "must be a step made from this group (epStepCreate)")
        }
        return step
    }
}

/// A caller's `epLayoutInfo_t`, checked before the call so that a bad one fails before any rank
/// moves a row; filled after it.
struct LayoutInfoDestination {
    let pointer: UnsafeMutablePointer<epLayoutInfo_t>

    /// nil when the caller passed NULL (no layout info wanted).
    init?(_ pointer: UnsafeMutablePointer<epLayoutInfo_t>?, _ name: @autoclosure () -> String) throws(EPError) {
        guard let pointer else { return nil }
        _ = try epLayoutInfo_t.read(pointer, name())
        self.pointer = pointer
    }

    func fill(_ info: LayoutInfo) {
        var c = UnsafeRawPointer(pointer).loadUnaligned(as: epLayoutInfo_t.self)
        store(info.expertCounters, c.expertCounters)
        store(info.expertOffsets, c.expertOffsets)
        store(info.sourceRankCounters, c.sourceRankCounters)
        store(info.expertSourceCounters, c.expertSourceCounters)
        c.receivedTotal = Int64(info.receivedTotal)
        c.droppedTokens = Int64(info.droppedTokens)
        write(c, to: UnsafeMutableRawPointer(pointer))
    }

    private func store(_ values: [Int], _ array: UnsafeMutablePointer<Int64>?) {
        guard let array else { return }
        let raw = UnsafeMutableRawPointer(array)
        for (i, v) in values.enumerated() { raw.storeBytes(of: Int64(v), toByteOffset: i * 8, as: Int64.self) }
    }
}
