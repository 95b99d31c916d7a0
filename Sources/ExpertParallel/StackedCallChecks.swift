/// The stacked calls' checks read from the descriptions themselves: `CallShapes.validateDispatch`
/// and `validateCombine`'s rules (types, places, which arguments the layout and call take, an
/// address wherever there are elements) without building a view of any part. A `false` is not
/// an error: the caller then runs the view checks, which name what is wrong (or pass, where these
/// were stricter); so these may refuse more, never less.
extension CallShapes {
    /// The shape of rank 0's part of a stacked dispatch's `field`, for `tokens` rows per rank.
    func shape(_ field: CheckedStackedDispatch.Field, tokens b: Int) -> [Int] {
        switch field {
        case .topkIdx, .topkWeights: [b, config.topK]
        case .inputs: [b, config.hidden]
        case .scales: [b, config.fp8Format?.scaleWordsPerRow ?? 1]
        case .received: receiveShape
        case .receivedTopkIdx, .receivedTopkWeights: receiveRoutingShape ?? []
        case .receivedScales: receiveScalesShape ?? []
        case .expertCounts: countsShape
        case .expertSourceCounts: sourceCountsShape
        }
    }

    /// The elements of that part (the product of `shape(field, tokens:)`, no array built).
    func elements(_ field: CheckedStackedDispatch.Field, tokens b: Int) -> Int {
        switch field {
        case .topkIdx, .topkWeights: b * config.topK
        case .inputs: b * config.hidden
        case .scales: b * (config.fp8Format?.scaleWordsPerRow ?? 1)
        case .received: receiveElements
        case .receivedTopkIdx, .receivedTopkWeights: routingElements
        case .receivedScales: scalesElements
        case .expertCounts: config.localExperts
        case .expertSourceCounts: config.localExperts * config.ranks
        }
    }

    /// The shape of rank 0's part of a stacked combine's `field`, for the most rows of any rank.
    func shape(_ field: CheckedStackedCombine.Field, tokens most: Int) -> [Int] {
        switch field {
        case .expertOutputs: receiveShape
        // The weights combine applies: the source's [B, K] (LL expert-major), the per-slot [N] (HT expert-major).
        case .topkWeights: config.layout == .expertMajor ? [most, config.topK] : slotWeightsShape
        case .weightGradients: receiveRoutingShape ?? []
        case .combined: [most, config.hidden]
        case .topkWeightGradients: [most, config.topK]
        }
    }

    func elements(_ field: CheckedStackedCombine.Field, tokens most: Int) -> Int {
        switch field {
        case .expertOutputs: receiveElements
        case .topkWeights: config.layout == .expertMajor ? most * config.topK : config.receiveCapacity
        case .weightGradients: routingElements
        case .combined: most * config.hidden
        case .topkWeightGradients: most * config.topK
        }
    }

    /// Whether a stacked dispatch passes the checks of `validateDispatch` (and, with topkIdx, the
    /// update's) on rank 0's parts.
    func passesDispatch(_ call: StackedDispatch, location: MemoryLocation) -> Bool {
        let b = call.tokens
        func given(_ field: CheckedStackedDispatch.Field, _ types: [DataType]) -> Bool {
            guard let t = call[field] else { return false }
            return types.contains(t.dtype) && t.location == location && (t.address != 0 || elements(field, tokens: b) == 0)
        }
        func absentOrGiven(_ field: CheckedStackedDispatch.Field, _ types: [DataType]) -> Bool { call[field] == nil || given(field, types) }
        guard absentOrGiven(.topkIdx, Self.indices), given(.inputs, dispatchInputTypes), given(.received, receiveTypes),
              absentOrGiven(.expertCounts, Self.i32), absentOrGiven(.expertSourceCounts, Self.i32) else { return false }
        if let fp8 = config.fp8, config.fp8Format != nil, receiveScalesShape != nil {
            let scales = fp8.source == .passThrough ? given(.scales, scaleTypes) : call.scales == nil
            guard scales, given(.receivedScales, scaleTypes) else { return false }
        } else if call.scales != nil || call.receivedScales != nil {
            return false
        }
        if receiveRoutingShape != nil {
            return given(.topkWeights, Self.f32) && given(.receivedTopkIdx, Self.indices) && given(.receivedTopkWeights, Self.f32)
        }
        // (A layout without received routing takes none: given, it is refused.)
        return absentOrGiven(.topkWeights, Self.f32) && call.receivedTopkIdx == nil && call.receivedTopkWeights == nil
    }

    /// Whether a stacked combine passes the checks of `validateCombine` on rank 0's parts (`most`
    /// rows: the most of any rank).
    func passesCombine(_ call: StackedCombine, tokens most: Int, direction: PassDirection, location: MemoryLocation) -> Bool {
        func given(_ field: CheckedStackedCombine.Field, _ types: [DataType]) -> Bool {
            guard let t = call[field] else { return false }
            return types.contains(t.dtype) && t.location == location && (t.address != 0 || elements(field, tokens: most) == 0)
        }
        guard config.elementType.isFloating, given(.expertOutputs, elementTypes), given(.combined, elementTypes) else { return false }
        // The weights and the gradients: given where the call takes them, absent where it does not.
        guard combineTakesWeights(direction) ? given(.topkWeights, Self.f32) : call.topkWeights == nil else { return false }
        if combineTakesGradients(direction), receiveRoutingShape != nil {
            return given(.weightGradients, Self.f32) && given(.topkWeightGradients, Self.f32)
        }
        return call.weightGradients == nil && call.topkWeightGradients == nil
    }

    // The group's shapes: their products may pass Int.max (the config bounds experts, hidden and
    // maxTokensPerRank, not their product); such a part is refused by its stride check.
    private var receiveElements: Int { Self.saturatingProduct(receiveShape) }
    private var routingElements: Int { Self.saturatingProduct(receiveRoutingShape ?? []) }
    private var scalesElements: Int { Self.saturatingProduct(receiveScalesShape ?? []) }

    /// The product of `shape`, or Int.max where it overflows.
    static func saturatingProduct(_ shape: [Int]) -> Int { TensorRef.checkedProduct(shape) ?? .max }
}
