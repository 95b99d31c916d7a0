/// The shapes every backend expects for a call, and their validation. Shared so that all
/// backends reject the same inputs with the same messages.
extension GroupConfig {
    /// Shape of the dispatch `tokens` output (and of the combine `expertOutputs` input).
    public var receiveShape: [Int] {
        switch layout {
        case .expertMajor: [localExperts, ranks * maxTokensPerRank, hidden]
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

    /// Checks a dispatch call's tensors for `tokens` source rows.
    public func validateDispatch(
        _ input: DispatchInput, _ output: DispatchOutput, tokens: Int, location: MemoryLocation = .host
    ) throws(EPError) {
        try TensorCheck.require(input.tokens, "input.tokens", dtypes: Self.rowTypes(dispatchInputType), shape: [tokens, hidden], location: location)
        try TensorCheck.require(output.tokens, "output.tokens", dtypes: Self.rowTypes(receiveElementType), shape: receiveShape, location: location)
        if let fp8, let format = fp8Format, let scalesShape = receiveScalesShape {
            if fp8.source == .passThrough {
                try TensorCheck.require(input.scales, "input.scales", dtypes: [fp8.scaleType], shape: [tokens, format.scaleWordsPerRow], location: location)
            } else if input.scales != nil {
                throw .invalidArgument(field: "input.scales", value: "given", requirement: "must be nil: this group quantises the rows itself (fp8 \(fp8))")
            }
            try TensorCheck.require(output.scales, "output.scales", dtypes: [fp8.scaleType], shape: scalesShape, location: location)
        } else {
            for (scales, name) in [(input.scales, "input.scales"), (output.scales, "output.scales")] where scales != nil {
                throw .invalidArgument(field: name, value: "given", requirement: "must be nil: only FP8 groups move scales")
            }
        }
        if let routingShape = receiveRoutingShape {
            try TensorCheck.require(input.topkWeights, "input.topkWeights", dtypes: [.f32], shape: [tokens, topK], location: location)
            try TensorCheck.require(output.topkIdx, "output.topkIdx", dtypes: [.i32, .i64], shape: routingShape, location: location)
            try TensorCheck.require(output.topkWeights, "output.topkWeights", dtypes: [.f32], shape: routingShape, location: location)
        } else if let weights = input.topkWeights {
            try TensorCheck.require(weights, "input.topkWeights", dtypes: [.f32], shape: [tokens, topK], location: location)
        }
        if let counts = output.expertCounts {
            try TensorCheck.require(counts, "output.expertCounts", dtypes: [.i32], shape: [localExperts], location: location)
        }
        if let counts = output.expertSourceCounts {
            try TensorCheck.require(counts, "output.expertSourceCounts", dtypes: [.i32], shape: [localExperts, ranks], location: location)
        }
    }

    /// Checks a combine call's tensors for `tokens` source rows.
    public func validateCombine(
        _ input: CombineInput, _ output: CombineOutput, tokens: Int, direction: PassDirection,
        location: MemoryLocation = .host
    ) throws(EPError) {
        guard elementType.isFloating else {
            throw .invalidConfig(field: "elementType", value: "\(elementType)", requirement: "combine needs bf16, f16 or f32 (u8 is dispatch only)")
        }
        try TensorCheck.require(input.expertOutputs, "input.expertOutputs", dtypes: [elementType], shape: receiveShape, location: location)
        try TensorCheck.require(output.tokens, "output.tokens", dtypes: [elementType], shape: [tokens, hidden], location: location)
        if direction == .forward, layout == .expertMajor {
            try TensorCheck.require(input.topkWeights, "input.topkWeights", dtypes: [.f32], shape: [tokens, topK], location: location)
        }
        if direction == .forward, isExpertMajorHT {
            try TensorCheck.require(input.topkWeights, "input.topkWeights (the per-slot weights dispatch delivered)", dtypes: [.f32], shape: [receiveCapacity], location: location)
        }
        if direction == .backward, algorithm == .highThroughput {
            try TensorCheck.require(input.weightGradients, "input.weightGradients", dtypes: [.f32], shape: receiveRoutingShape!, location: location)
            try TensorCheck.require(output.topkWeightGradients, "output.topkWeightGradients", dtypes: [.f32], shape: [tokens, topK], location: location)
        }
    }
}
