extension HostRank {
    /// Sends each of this rank's rows straight into its final slot(s) on the destination ranks.
    public func dispatch(
        _ handle: HostHandle, _ input: DispatchInput, into output: DispatchOutput, direction: PassDirection = .forward
    ) throws(EPError) -> LayoutInfo {
        try exclusive { () throws(EPError) -> LayoutInfo in try dispatchNow(handle, input, into: output, direction: direction) }
    }

    private func dispatchNow(
        _ handle: HostHandle, _ input: DispatchInput, into output: DispatchOutput, direction: PassDirection
    ) throws(EPError) -> LayoutInfo {
        // Every check fails inside the exchange below, so the other ranks learn of it at once.
        let step = Result { () throws(EPError) in
            let step = try self.step(handle, combine: false)
            try group.shapes.validateDispatch(input, output, tokens: step.routing.tokens)
            return step
        }
        let participants = (try? step.get())?.participants ?? group.transport.activeRanks
        let outputs = try exchange(step.map { _ in output }, participants)
        let (routing, plan) = try step.map { ($0.routing, $0.plan) }.get()

        let r = config.ranks, l = config.localExperts, k = config.topK, rowBytes = config.wireRowBytes
        let wire = WireRows(config, input)
        defer { wire.deallocate() }
        for t in 0..<routing.tokens {
            let row = wire.row(t)
            switch config.layout {
            case .expertMajor, .expertMajorPadded:
                for c in 0..<k where plan.selectionRow[t * k + c] >= 0 {
                    let e = routing.expert(t, c), slot = plan.selectionRow[t * k + c]
                    let out = outputs[e / l]!
                    (out.tokens.address! + slot * rowBytes).copyMemory(from: row, byteCount: rowBytes)
                    wire.copyScales(to: out, slot: slot)
                    if config.isExpertMajorHT, let idx = out.topkIdx, let weights = out.topkWeights {
                        storeIndex(e % l, idx, slot)
                        weights.address!.storeBytes(of: loadWeight(input.topkWeights!, t * k + c), toByteOffset: slot * 4, as: Float.self)
                    }
                }
            case .rankMajor, .flat:
                for d in 0..<r where plan.pairRow[t * r + d] >= 0 {
                    let slot = plan.pairRow[t * r + d], out = outputs[d]!
                    (out.tokens.address! + slot * rowBytes).copyMemory(from: row, byteCount: rowBytes)
                    wire.copyScales(to: out, slot: slot)
                    for c in 0..<k {
                        let e = routing.expert(t, c), here = e >= 0 && e / l == d
                        storeIndex(here ? e % l : -1, out.topkIdx!, slot * k + c)
                        out.topkWeights!.address!.storeBytes(
                            of: here ? loadWeight(input.topkWeights!, t * k + c) : 0, toByteOffset: (slot * k + c) * 4, as: Float.self)
                    }
                }
            }
        }
        if config.isExpertMajorHT { writePadding(plan.received, output) }
        finishExchange(participants)   // peers are done with this rank's buffers
        try plan.received.writeCounts(experts: output.expertCounts, expertSources: output.expertSourceCounts)
        handle.markDispatched()
        return plan.received
    }

    /// Zero rows, weight 0 and index -1 for the padding at the end of each expert zone.
    private func writePadding(_ info: LayoutInfo, _ output: DispatchOutput) {
        for local in 0..<config.localExperts {
            let start = info.expertOffsets[local] + info.expertCounters[local]
            let end = info.expertOffsets[local] + roundUp(info.expertCounters[local], config.alignment)
            for slot in start..<end {
                (output.tokens.address! + slot * config.wireRowBytes).initializeMemory(as: UInt8.self, repeating: 0, count: config.wireRowBytes)
                if let scales = output.scales?.address, let words = config.fp8Format?.scaleWordsPerRow {
                    (scales + slot * words * 4).initializeMemory(as: UInt8.self, repeating: 0, count: words * 4)
                }
                storeIndex(-1, output.topkIdx!, slot)
                output.topkWeights!.address!.storeBytes(of: Float(0), toByteOffset: slot * 4, as: Float.self)
            }
        }
    }
}

func storeIndex(_ value: Int, _ tensor: TensorRef, _ index: Int) {
    if tensor.dtype == .i32 {
        tensor.address!.storeBytes(of: Int32(value), toByteOffset: index * 4, as: Int32.self)
    } else {
        tensor.address!.storeBytes(of: Int64(value), toByteOffset: index * 8, as: Int64.self)
    }
}

func loadWeight(_ tensor: TensorRef, _ index: Int) -> Float {
    tensor.address!.load(fromByteOffset: index * 4, as: Float.self)
}

/// One source row at a time as a dispatch moves it: the caller's row itself, or (FP8 quantise)
/// its e4m3 codes and scale words, made in one row of scratch; FP8 pass-through rows come with
/// the caller's scales.
private final class WireRows {
    let config: GroupConfig
    /// The row `row(_:)` returned last.
    private var currentRow = 0
    let input: DispatchInput
    let format: FP8RowFormat?
    let quantize: Bool
    /// Quantise: hidden floats, hidden codes, the scale words.
    let scratch: UnsafeMutableRawPointer?

    init(_ config: GroupConfig, _ input: DispatchInput) {
        self.config = config
        self.input = input
        format = config.fp8Format
        quantize = config.fp8?.source == .quantize
        scratch = quantize ? UnsafeMutableRawPointer.allocate(byteCount: config.hidden * 5 + (format?.scaleWordsPerRow ?? 0) * 4, alignment: 16) : nil
    }

    func deallocate() { scratch?.deallocate() }

    private var scaleBytes: Int { (format?.scaleWordsPerRow ?? 0) * 4 }
    private var values: UnsafeMutableBufferPointer<Float> {
        UnsafeMutableBufferPointer(start: scratch!.assumingMemoryBound(to: Float.self), count: config.hidden)
    }
    private var codes: UnsafeMutableBufferPointer<UInt8> {
        UnsafeMutableBufferPointer(start: (scratch! + config.hidden * 4).assumingMemoryBound(to: UInt8.self), count: config.hidden)
    }
    private var words: UnsafeMutableBufferPointer<Int32> {
        UnsafeMutableBufferPointer(start: (scratch! + config.hidden * 5).assumingMemoryBound(to: Int32.self), count: format?.scaleWordsPerRow ?? 0)
    }

    /// The bytes of row `t` as they move (quantised now, for FP8 quantise).
    func row(_ t: Int) -> UnsafeRawPointer {
        currentRow = t
        guard quantize, let format else { return UnsafeRawPointer(input.tokens.address! + t * config.wireRowBytes) }
        let base = UnsafeRawPointer(input.tokens.address!), h = config.hidden
        for i in 0..<h { values[i] = ElementConversion.load(base, t * h + i, config.elementType) }
        format.quantizeChecked(UnsafeBufferPointer(values), codes: codes, scaleWords: words)   // both sized by config
        return UnsafeRawPointer(codes.baseAddress!)
    }

    /// Writes the scale words of the row last returned by `row(t)` into `output.scales` at `slot`.
    func copyScales(to output: DispatchOutput, slot: Int) {
        guard format != nil, let destination = output.scales?.address else { return }
        let from: UnsafeRawPointer = quantize
            ? UnsafeRawPointer(words.baseAddress!)
            : UnsafeRawPointer(input.scales!.address! + currentRow * scaleBytes)
        (destination + slot * scaleBytes).copyMemory(from: from, byteCount: scaleBytes)
    }
}
