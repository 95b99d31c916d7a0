/// The shapes every backend expects for a call, and their validation. Shared so that all
/// backends reject the same inputs with the same messages.
extension GroupConfig {
    /// Shape of the dispatch `tokens` output (and of the combine `expertOutputs` input).
    public var receiveShape: [Int] {
        switch layout {
        case .expertMajor: [localExperts, Saturating.product(ranks, maxTokensPerRank), hidden]
        case .rankMajor: [ranks, maxTokensPerRank, hidden]
        case .flat, .expertMajorPadded: [receiveCapacity, hidden]
        }
    }

    /// Shape of the dispatch `topkIdx`/`topkWeights` outputs; nil where the layout has none.
    public var receiveRoutingShape: [Int]? {
        switch layout {
        case .expertMajor: nil
        case .rankMajor: [ranks, maxTokensPerRank, topK]
        case .flat: [receiveCapacity, topK]
        case .expertMajorPadded: [receiveCapacity]
        }
    }

    /// Checks the configuration (`validated()`), then a dispatch call's tensors for `tokens` source rows.
    public func validateDispatch(
        _ input: DispatchInput, _ output: DispatchOutput, tokens: Int, location: MemoryLocation = .host
    ) throws(EPError) {
        try CallShapes(self).validateDispatch(input, output, tokens: tokens, location: location)
    }

    /// Checks the configuration (`validated()`), then a combine call's tensors for `tokens` source rows.
    public func validateCombine(
        _ input: CombineInput, _ output: CombineOutput, tokens: Int, direction: PassDirection,
        location: MemoryLocation = .host
    ) throws(EPError) {
        try CallShapes(self).validateCombine(input, output, tokens: tokens, direction: direction, location: location)
    }
}

/// What a dispatch's and a combine's tensors must be, worked out once per group: a check against
/// it allocates nothing, which matters where every rank's tensors are checked on every call (the
/// GPU groups). Same checks and messages as `GroupConfig.validateDispatch` / `validateCombine`.
/// A class: a call passes one reference, not a copy whose every array is retained and released.
public final class CallShapes: Sendable {
    public let config: GroupConfig
    let dispatchInputTypes: [DataType]
    let receiveTypes: [DataType]
    /// The config's shapes, made once (the config computes a new array each time it is asked).
    public let receiveShape: [Int]
    public let receiveRoutingShape: [Int]?
    public let receiveScalesShape: [Int]?
    public let countsShape: [Int]
    public let sourceCountsShape: [Int]
    public let slotWeightsShape: [Int]
    let elementTypes: [DataType]
    let scaleTypes: [DataType]
    static let f32: [DataType] = [.f32], i32: [DataType] = [.i32], indices: [DataType] = [.i32, .i64]

    /// The shapes of `config`, which is checked first (`validated()`): a configuration it
    /// refuses throws its `invalidConfig`.
    public convenience init(_ config: GroupConfig) throws(EPError) {
        self.init(validated: try config.validated())
    }

    /// The shapes of `config`, which its caller has validated (a group's own configuration).
    package init(validated config: GroupConfig) {
        self.config = config
        dispatchInputTypes = GroupConfig.rowTypes(config.dispatchInputType)
        receiveTypes = GroupConfig.rowTypes(config.receiveElementType)
        receiveShape = config.receiveShape
        receiveRoutingShape = config.receiveRoutingShape
        receiveScalesShape = config.receiveScalesShape
        countsShape = [config.localExperts]
        sourceCountsShape = [config.localExperts, config.ranks]
        slotWeightsShape = [config.receiveCapacity]
        elementTypes = [config.elementType]
        scaleTypes = config.fp8.map { [$0.scaleType] } ?? []
    }

    /// Checks a dispatch call's tensors for `tokens` source rows.
    public func validateDispatch(
        _ input: DispatchInput, _ output: DispatchOutput, tokens: Int, location: MemoryLocation = .host
    ) throws(EPError) {
        let config = config
        try TensorCheck.require(input.tokens, "input.tokens", dtypes: dispatchInputTypes, rows: tokens, columns: config.hidden, location: location)
        try TensorCheck.require(output.tokens, "output.tokens", dtypes: receiveTypes, shape: receiveShape, location: location)
        if let fp8 = config.fp8, let format = config.fp8Format, let scalesShape = receiveScalesShape {
            if fp8.source == .passThrough {
                try TensorCheck.require(input.scales, "input.scales", dtypes: scaleTypes, rows: tokens, columns: format.scaleWordsPerRow,
                                        location: location)
            } else if input.scales != nil {
                throw .invalidArgument(field: "input.scales", value: "given", requirement: "must be nil: this group quantises the rows itself (fp8 \(fp8))")
            }
            try TensorCheck.require(output.scales, "output.scales", dtypes: scaleTypes, shape: scalesShape, location: location)
        } else {
            try refuseGiven(input.scales, "input.scales", because: Self.noScales)
            try refuseGiven(output.scales, "output.scales", because: Self.noScales)
        }
        if let routingShape = receiveRoutingShape {
            try TensorCheck.require(input.topkWeights, "input.topkWeights", dtypes: Self.f32, rows: tokens, columns: config.topK, location: location)
            try TensorCheck.require(output.topkIdx, "output.topkIdx", dtypes: Self.indices, shape: routingShape, location: location)
            try TensorCheck.require(output.topkWeights, "output.topkWeights", dtypes: Self.f32, shape: routingShape, location: location)
        } else {
            if let weights = input.topkWeights {
                try TensorCheck.require(weights, "input.topkWeights", dtypes: Self.f32, rows: tokens, columns: config.topK, location: location)
            }
            try refuseUnused(output)
        }
        if let counts = output.expertCounts {
            try TensorCheck.require(counts, "output.expertCounts", dtypes: Self.i32, shape: countsShape, location: location)
        }
        if let counts = output.expertSourceCounts {
            try TensorCheck.require(counts, "output.expertSourceCounts", dtypes: Self.i32, shape: sourceCountsShape, location: location)
        }
        try refuseOverlaps(input, output)
    }

    /// Checks a combine call's tensors for `tokens` source rows.
    public func validateCombine(
        _ input: CombineInput, _ output: CombineOutput, tokens: Int, direction: PassDirection,
        location: MemoryLocation = .host
    ) throws(EPError) {
        let config = config
        guard config.elementType.isFloating else {
            throw .invalidConfig(field: "elementType", value: "\(config.elementType)", requirement: "combine needs bf16, f16 or f32 (u8 is dispatch only)")
        }
        try TensorCheck.require(input.expertOutputs, "input.expertOutputs", dtypes: elementTypes, shape: receiveShape, location: location)
        try TensorCheck.require(output.tokens, "output.tokens", dtypes: elementTypes, rows: tokens, columns: config.hidden, location: location)
        if direction == .forward, config.layout == .expertMajor {
            try TensorCheck.require(input.topkWeights, "input.topkWeights", dtypes: Self.f32, rows: tokens, columns: config.topK, location: location)
        }
        if direction == .forward, config.isExpertMajorHT {
            try TensorCheck.require(input.topkWeights, "input.topkWeights", dtypes: Self.f32,
                                    shape: slotWeightsShape, location: location)
        }
        if direction == .backward, config.algorithm == .highThroughput, let routingShape = receiveRoutingShape {
            try TensorCheck.require(input.weightGradients, "input.weightGradients", dtypes: Self.f32, shape: routingShape, location: location)
            try TensorCheck.require(output.topkWeightGradients, "output.topkWeightGradients", dtypes: Self.f32, rows: tokens, columns: config.topK,
                                    location: location)
        }
        if !combineTakesWeights(direction) {
            try refuseGiven(input.topkWeights, "input.topkWeights", because: "\(combineWeighs) (this call: \(direction), layout \(config.layout) (\(algorithmName)))")
        }
        if !combineTakesGradients(direction) {
            let why = "\(combineGradients) (this call: \(direction), \(algorithmName))"
            try refuseGiven(input.weightGradients, "input.weightGradients", because: why)
            try refuseGiven(output.topkWeightGradients, "output.topkWeightGradients", because: why)
        }
        try refuseOverlaps(input, output)
    }

    // MARK: arguments a call does not take

    // An argument the group's layout, algorithm, FP8 mode or the call's direction has no use for
    // is refused when given, on every backend (these checks are the one place that decides), so
    // that a caller who passes one learns it is not read instead of trusting what it holds.

    /// Refuses a dispatch's outputs that the group does not produce: received scales without FP8,
    /// received routing where the layout has none (LL expert-major). `validateDispatch` runs it;
    /// a backend that checks the caller's outputs elsewhere (an NCCL rank, which receives into its
    /// own buffers and then copies) runs it on them.
    public func refuseUnused(_ output: DispatchOutput) throws(EPError) {
        if receiveScalesShape == nil { try refuseGiven(output.scales, "output.scales", because: Self.noScales) }
        guard receiveRoutingShape == nil else { return }
        try refuseGiven(output.topkIdx, "output.topkIdx", because: noRouting)
        try refuseGiven(output.topkWeights, "output.topkWeights", because: noRouting)
    }

    private static let noScales = "must be nil: only FP8 groups move scales"

    /// Whether a combine in `direction` reads `input.topkWeights`: the forward pass of the
    /// expert-major layouts (LL: the source's `[B, K]`; HT: the per-slot `[N]`).
    public func combineTakesWeights(_ direction: PassDirection) -> Bool {
        direction == .forward && (config.layout == .expertMajor || config.isExpertMajorHT)
    }

    /// Whether a combine in `direction` reads `input.weightGradients` and writes
    /// `output.topkWeightGradients`: the backward pass of HT.
    public func combineTakesGradients(_ direction: PassDirection) -> Bool {
        direction == .backward && config.algorithm == .highThroughput
    }

    /// Why a dispatch of this layout takes no received routing.
    private var noRouting: String { "must be nil: layout \(config.layout) (\(algorithmName)) receives no routing" }
    private var combineWeighs: String { "must be nil: only a forward combine of an expert-major layout weighs the rows" }
    private var combineGradients: String { "must be nil: only a backward HT combine takes and returns weight gradients" }
    private var algorithmName: String { config.algorithm == .lowLatency ? "LL" : "HT" }

    /// Refuses `tensor` when given: the call has no use for it (`requirement` says why).
    private func refuseGiven(_ tensor: TensorRef?, _ name: String, because requirement: @autoclosure () -> String) throws(EPError) {
        guard tensor != nil else { return }
        throw .invalidArgument(field: name, value: "given", requirement: requirement())
    }
}
