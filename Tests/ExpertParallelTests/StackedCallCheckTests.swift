@testable import ExpertParallel
import Testing

/// The stacked calls check their descriptions without building views (`CallShapes.passesDispatch`
/// / `passesCombine`) and fall back to the views' checks only where those refuse. So they must
/// never pass what the views' checks refuse (they may refuse more: the views' checks then decide),
/// and must pass every valid call (else the data path pays for the views). Random mutations of
/// valid calls, every layout and FP8 mode, both directions.
@Suite struct StackedCallCheckTests {
    static let configs: [GroupConfig] = [
        GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 8, topK: 2, hidden: 128, maxTokensPerRank: 4),
        GroupConfig(algorithm: .lowLatency, ranks: 3, experts: 6, topK: 2, hidden: 64, maxTokensPerRank: 4, layout: .rankMajor),
        GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 8, topK: 3, hidden: 96, maxTokensPerRank: 5),
        GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 64, maxTokensPerRank: 4, layout: .expertMajorPadded(alignment: 4)),
        GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 256, maxTokensPerRank: 4,
                    fp8: FP8Dispatch(scales: .float32Block128, source: .passThrough)),
        GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 256, maxTokensPerRank: 4,
                    fp8: FP8Dispatch(scales: .ue8m0Block128)),
    ]
    static let location = MemoryLocation.device(0)

    /// A valid description of every argument the config's dispatch takes, each at its own address.
    static func dispatch(_ config: GroupConfig, tokens: Int) -> StackedDispatch {
        var next: UInt64 = 0x10000
        func t(_ dtype: DataType) -> StackedTensor { next += 0x10000; return StackedTensor(address: next, dtype: dtype, location: location) }
        let routing = config.receiveRoutingShape != nil
        let fp8 = config.fp8
        return StackedDispatch(
            tokens: tokens, topkIdx: t(.i32), inputs: t(config.dispatchInputType), topkWeights: t(.f32),
            scales: fp8?.source == .passThrough ? t(fp8!.scaleType) : nil, received: t(config.receiveElementType),
            receivedTopkIdx: routing ? t(.i32) : nil, receivedTopkWeights: routing ? t(.f32) : nil,
            receivedScales: fp8.map { t($0.scaleType) }, expertCounts: t(.i32), expertSourceCounts: t(.i32))
    }

    static func combine(_ config: GroupConfig, direction: PassDirection) -> StackedCombine {
        var next: UInt64 = 0x10000
        func t(_ dtype: DataType) -> StackedTensor { next += 0x10000; return StackedTensor(address: next, dtype: dtype, location: location) }
        let backwardHT = direction == .backward && config.algorithm == .highThroughput
        // The weights only where the combine weighs (forward, expert-major layouts): given elsewhere they are refused.
        let weighs = direction == .forward && (config.layout == .expertMajor || config.isExpertMajorHT)
        return StackedCombine(expertOutputs: t(config.elementType), topkWeights: weighs ? t(.f32) : nil, weightGradients: backwardHT ? t(.f32) : nil,
                              combined: t(config.elementType), topkWeightGradients: backwardHT ? t(.f32) : nil)
    }

    /// One random change of a description: its type, place, address (none, or one byte off), or it
    /// taken away or given where it was not.
    static func mutated(_ tensor: StackedTensor?, _ rng: inout SeededGenerator) -> StackedTensor? {
        guard var t = tensor ?? (Bool.random(using: &rng) ? StackedTensor(address: 0x9990000, dtype: .f32, location: location) : nil) else { return nil }
        switch Int.random(in: 0..<5, using: &rng) {
        case 0: t.dtype = DataType.allCases.randomElement(using: &rng)!
        case 1: t.location = [MemoryLocation.host, .device(1), .device(0)].randomElement(using: &rng)!
        case 2: t.address = [0, t.address + 1, t.address].randomElement(using: &rng)!
        case 3: return nil
        default: break
        }
        return t
    }

    /// What the views' checks say (the checks a per-rank call's tensors get).
    static func viewsPass(_ call: StackedDispatch, _ shapes: CallShapes) -> Bool {
        func part(_ field: CheckedStackedDispatch.Field) -> TensorRef? { call[field].map { $0.part(0, shape: shapes.shape(field, tokens: call.tokens)) } }
        do {
            if let idx = part(.topkIdx) {
                try TensorCheck.require(idx, "topkIdx", dtypes: [.i32, .i64], rows: call.tokens, columns: shapes.config.topK, location: location)
            }
            guard let tokens = part(.inputs), let received = part(.received) else { return false }
            try shapes.validateDispatch(
                DispatchInput(tokens: tokens, topkWeights: part(.topkWeights), scales: part(.scales)),
                DispatchOutput(tokens: received, topkIdx: part(.receivedTopkIdx), topkWeights: part(.receivedTopkWeights),
                               expertCounts: part(.expertCounts), expertSourceCounts: part(.expertSourceCounts), scales: part(.receivedScales)),
                tokens: call.tokens, location: location)
            return true
        } catch {
            return false
        }
    }

    static func viewsPass(_ call: StackedCombine, _ shapes: CallShapes, most: Int, direction: PassDirection) -> Bool {
        func part(_ field: CheckedStackedCombine.Field) -> TensorRef? { call[field].map { $0.part(0, shape: shapes.shape(field, tokens: most)) } }
        guard let outputs = part(.expertOutputs), let combined = part(.combined) else { return false }
        do {
            try shapes.validateCombine(CombineInput(expertOutputs: outputs, topkWeights: part(.topkWeights), weightGradients: part(.weightGradients)),
                                       CombineOutput(tokens: combined, topkWeightGradients: part(.topkWeightGradients)),
                                       tokens: most, direction: direction, location: location)
            return true
        } catch {
            return false
        }
    }

    /// A part's element count (the strides' and the address checks' bytes) is its shape's product
    /// (the views' and the messages'): two functions, kept from drifting apart here.
    @Test(arguments: configs.indices)
    func everyPartsElementsAreItsShapesProduct(_ index: Int) throws {
        let shapes = try CallShapes(Self.configs[index])
        for tokens in [0, 1, 3] {
            for field in CheckedStackedDispatch.Field.allCases {
                #expect(shapes.elements(field, tokens: tokens) == shapes.shape(field, tokens: tokens).reduce(1, *), "config \(index): \(field)")
            }
            for field in CheckedStackedCombine.Field.allCases {
                #expect(shapes.elements(field, tokens: tokens) == shapes.shape(field, tokens: tokens).reduce(1, *), "config \(index): \(field)")
            }
        }
    }

    @Test(arguments: configs.indices)
    func theDescriptionChecksNeverPassWhatTheViewChecksRefuse(_ index: Int) throws {
        let config = Self.configs[index], shapes = try CallShapes(config)
        var rng = SeededGenerator(seed: index)
        var refusedByBoth = 0, passedByBoth = 0
        for tokens in [0, 1, config.maxTokensPerRank] {
            let valid = Self.dispatch(config, tokens: tokens)
            #expect(shapes.passesDispatch(valid, location: Self.location), "config \(index): a valid dispatch of \(tokens) tokens")
            #expect(Self.viewsPass(valid, shapes))
            for _ in 0..<400 {
                var call = valid
                for _ in 0..<Int.random(in: 1...2, using: &rng) {
                    let field = CheckedStackedDispatch.Field.allCases.randomElement(using: &rng)!
                    let changed = Self.mutated(call[field], &rng)
                    switch field {
                    case .topkIdx: call.topkIdx = changed
                    case .inputs: call.inputs = changed ?? call.inputs
                    case .topkWeights: call.topkWeights = changed
                    case .scales: call.scales = changed
                    case .received: call.received = changed ?? call.received
                    case .receivedTopkIdx: call.receivedTopkIdx = changed
                    case .receivedTopkWeights: call.receivedTopkWeights = changed
                    case .receivedScales: call.receivedScales = changed
                    case .expertCounts: call.expertCounts = changed
                    case .expertSourceCounts: call.expertSourceCounts = changed
                    }
                }
                let quick = shapes.passesDispatch(call, location: Self.location), views = Self.viewsPass(call, shapes)
                #expect(!quick || views, "config \(index): the description checks passed a dispatch the view checks refuse: \(call)")
                if quick == views { if quick { passedByBoth += 1 } else { refusedByBoth += 1 } }
            }
            for direction in [PassDirection.forward, .backward] {
                let valid = Self.combine(config, direction: direction)
                #expect(shapes.passesCombine(valid, tokens: tokens, direction: direction, location: Self.location),
                        "config \(index): a valid \(direction) combine of \(tokens) tokens")
                for _ in 0..<200 {
                    var call = valid
                    let field = CheckedStackedCombine.Field.allCases.randomElement(using: &rng)!
                    let changed = Self.mutated(call[field], &rng)
                    switch field {
                    case .expertOutputs: call.expertOutputs = changed ?? call.expertOutputs
                    case .topkWeights: call.topkWeights = changed
                    case .weightGradients: call.weightGradients = changed
                    case .combined: call.combined = changed ?? call.combined
                    case .topkWeightGradients: call.topkWeightGradients = changed
                    }
                    let quick = shapes.passesCombine(call, tokens: tokens, direction: direction, location: Self.location)
                    #expect(!quick || Self.viewsPass(call, shapes, most: tokens, direction: direction),
                            "config \(index): the description checks passed a \(direction) combine the view checks refuse: \(call)")
                }
            }
        }
        // The mutations reach both answers (a test that only ever refused would check nothing).
        #expect(refusedByBoth > 100 && passedByBoth > 100, "config \(index): \(refusedByBoth) refused, \(passedByBoth) passed")
    }
}
