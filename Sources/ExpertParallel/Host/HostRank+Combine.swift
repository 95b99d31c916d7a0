extension HostRank {
    /// Reads the expert outputs for this rank's tokens from the destination ranks (pull) and
    /// reduces them in the fixed order of docs/architecture.md ("Order and arithmetic"): float32
    /// accumulation, one fused multiply-add per step, one rounding to the element type at the end.
    public func combine(
        _ handle: HostHandle, _ input: CombineInput, into output: CombineOutput, direction: PassDirection = .forward
    ) throws(EPError) {
        try exclusive { () throws(EPError) in try combineNow(handle, input, into: output, direction: direction) }
    }

    private func combineNow(
        _ handle: HostHandle, _ input: CombineInput, into output: CombineOutput, direction: PassDirection
    ) throws(EPError) {
        // Every check fails inside the exchange below, so the other ranks learn of it at once.
        let step = Result { () throws(EPError) in
            let step = try self.step(handle, combine: true)
            try group.shapes.validateCombine(input, output, tokens: step.routing.tokens, direction: direction)
            return step
        }
        let participants = (try? step.get())?.participants ?? group.transport.activeRanks
        let inputs = try exchange(step.map { _ in input }, participants)
        let (routing, plan) = try step.map { ($0.routing, $0.plan) }.get()

        let r = config.ranks, l = config.localExperts, k = config.topK, h = config.hidden
        let type = config.elementType, rowBytes = config.rowBytes
        let forward = direction == .forward
        // The reduction of each element is independent of the others, so a row is reduced in
        // pieces of at most `combinePiece` elements: the scratch stays bounded whatever `hidden`
        // is, and the bits are those of a whole-row reduction.
        let piece = min(h, Self.combinePiece)
        let accStorage = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(piece, 1))
        let partialStorage = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(piece, 1))
        defer { accStorage.deallocate(); partialStorage.deallocate() }
        let elementBytes = type.byteSize

        for t in 0..<routing.tokens {
            for start in stride(from: 0, to: h, by: piece) {
                let width = min(piece, h - start), offset = start * elementBytes
                let acc = UnsafeMutableBufferPointer(rebasing: accStorage[0..<width])
                let partial = UnsafeMutableBufferPointer(rebasing: partialStorage[0..<width])
                func row(_ d: Int, _ slot: Int) -> UnsafeRawPointer {
                    UnsafeRawPointer(inputs[d]!.expertOutputs.address! + slot * rowBytes + offset)
                }
                acc.update(repeating: 0)
                switch config.layout {
                case .expertMajor:
                    for c in 0..<k where plan.selectionRow[t * k + c] >= 0 {
                        let w: Float = forward ? loadWeight(input.topkWeights!, t * k + c) : 1
                        ElementConversion.accumulate(acc, weight: w, row: row(routing.expert(t, c) / l, plan.selectionRow[t * k + c]), type)
                    }
                case .rankMajor, .flat:
                    for d in 0..<r where plan.pairRow[t * r + d] >= 0 {
                        ElementConversion.accumulate(acc, weight: 1, row: row(d, plan.pairRow[t * r + d]), type)
                    }
                case .expertMajorPadded:
                    for d in 0..<r where plan.pairRow[t * r + d] >= 0 {
                        // The destination's partial sum over the token's slots, ascending local expert,
                        // rounded to the element type as if it had been sent as one row.
                        partial.update(repeating: 0)
                        let columns = (0..<k).filter { plan.selectionRow[t * k + $0] >= 0 && routing.expert(t, $0) / l == d }
                        for c in columns.sorted(by: { routing.expert(t, $0) < routing.expert(t, $1) }) {
                            let slot = plan.selectionRow[t * k + c]
                            let w: Float = forward ? loadWeight(inputs[d]!.topkWeights!, slot) : 1
                            ElementConversion.accumulate(partial, weight: w, row: row(d, slot), type)
                        }
                        for i in 0..<width { acc[i] = acc[i].addingProduct(1, roundTrip(partial[i], type)) }
                    }
                }
                ElementConversion.storeRow(acc, to: output.tokens.address! + t * rowBytes + offset, type)
            }
            if !forward, config.algorithm == .highThroughput { writeWeightGradients(t, routing, plan, inputs, output) }
        }
        finishExchange(participants)   // peers are done with this rank's buffers
    }

    /// Backward HT: the gradient of each (token, k) weight, read from the row or slot that
    /// received the selection; 0 where nothing was received.
    private func writeWeightGradients(
        _ t: Int, _ routing: RoutingTable, _ plan: RoutingPlan, _ inputs: [CombineInput?], _ output: CombineOutput
    ) {
        let r = config.ranks, l = config.localExperts, k = config.topK
        for c in 0..<k {
            var gradient: Float = 0
            let e = routing.expert(t, c)
            if e >= 0 {
                let d = e / l
                if config.isExpertMajorHT, plan.selectionRow[t * k + c] >= 0 {
                    gradient = loadWeight(inputs[d]!.weightGradients!, plan.selectionRow[t * k + c])
                } else if !config.isExpertMajorHT, plan.pairRow[t * r + d] >= 0 {
                    gradient = loadWeight(inputs[d]!.weightGradients!, plan.pairRow[t * r + d] * k + c)
                }
            }
            output.topkWeightGradients!.address!.storeBytes(of: gradient, toByteOffset: (t * k + c) * 4, as: Float.self)
        }
    }
}

extension HostRank {
    /// Elements of a row that combine reduces at a time (16 KiB of float32 scratch per buffer).
    package static let combinePiece = 4096
}

/// `value` rounded to `type` and read back as float32.
@inline(__always) func roundTrip(_ value: Float, _ type: DataType) -> Float {
    switch type {
    case .bf16: ElementConversion.bf16ToFloat(ElementConversion.floatToBF16(value))
    case .f16: ElementConversion.f16ToFloat(ElementConversion.floatToF16(value))
    default: value
    }
}
