import ExpertParallel

/// What an FP8 run on the host needs besides `BenchData`: the oracle's plain dispatch of the same
/// step (a group without FP8), whose received rows are combine's expert outputs (combine runs in
/// the element type, so its check is the plain one) and the reference of the FP8 rows' check;
/// and, for pass-through, each rank's source rows quantised once, before the timing.
final class FP8HostData: @unchecked Sendable {
    let format: FP8RowFormat
    /// Per rank, what a plain dispatch of the same step delivers (`receiveShape`, element type).
    let plainRows: [HostTensor]
    /// Pass-through: per rank, the e4m3 source rows `[B, hidden]` and their scales `[B, scale words]`.
    let sourceCodes: [HostTensor]?
    let sourceScales: [HostTensor]?

    init(config: GroupConfig, data: BenchData) throws {
        guard let fp8 = config.fp8, let format = config.fp8Format else { throw RunFailure("FP8HostData: \(config) has no fp8") }
        self.format = format
        var plain = config
        plain.fp8 = nil
        let group = try HostGroup(plain)
        let handle = try group.makeHandle()
        defer { handle.release() }
        try group.update(handle, topkIdx: data.topkIdx.map(\.ref))
        let outputs = try (0..<config.ranks).map { _ in try data.outputs(for: plain) }
        try group.dispatch(handle, (0..<config.ranks).map(data.dispatchInput), into: outputs.map(\.dispatch))
        plainRows = outputs.map(\.dispatchTokens)
        guard fp8.source == .passThrough else {
            sourceCodes = nil
            sourceScales = nil
            return
        }
        var codes: [HostTensor] = [], scales: [HostTensor] = []
        for x in data.tokens {
            let rows = x.shape[0]
            let c = try HostTensor(.e4m3, [rows, config.hidden]), s = try HostTensor(fp8.scaleType, [rows, format.scaleWordsPerRow])
            for t in 0..<rows { Self.quantize(x, row: t, format, codes: c, scales: s, at: t) }
            codes.append(c)
            scales.append(s)
        }
        sourceCodes = codes
        sourceScales = scales
    }

    /// Rank `rank`'s dispatch input: the element-type rows (quantise) or the e4m3 rows and scales.
    func dispatchInput(_ rank: Int, _ data: BenchData) -> DispatchInput {
        guard let sourceCodes, let sourceScales else { return data.dispatchInput(rank) }
        return DispatchInput(tokens: sourceCodes[rank].ref, topkWeights: data.weights[rank].ref, scales: sourceScales[rank].ref)
    }

    /// Combine's input: the plain received rows stand for the experts' outputs (identity experts).
    func combineInput(_ rank: Int, _ outputs: BenchData.Outputs, _ config: GroupConfig, _ data: BenchData) -> CombineInput {
        var input = data.combineInput(rank, outputs, config)
        input.expertOutputs = plainRows[rank].ref
        return input
    }

    /// Every receive slot of rank `rank`, exactly: the FP8 codes and scale words equal
    /// `FP8RowFormat.quantize` of the row a plain dispatch put in the same slot (both passes move
    /// each row to the same slot: the plan is the routing's). A slot whose plain row is zero (unused,
    /// or padding) may also hold zero codes and zero scale words, as the dispatch leaves it.
    func validate(rank: Int, config: GroupConfig, received: HostTensor, scales: HostTensor) -> Bool {
        let h = config.hidden, words = format.scaleWordsPerRow, plain = plainRows[rank]
        var values = [Float](repeating: 0, count: h)
        var codes = [UInt8](repeating: 0, count: h), wordsWant = [Int32](repeating: 0, count: words)
        for slot in 0..<(plain.byteCount / config.rowBytes) {
            for i in 0..<h { values[i] = BenchData.element(plain, slot * h + i) }
            let gotCodes = UnsafeRawBufferPointer(start: received.storage + slot * h, count: h)
            let gotWords = UnsafeRawBufferPointer(start: scales.storage + slot * words * 4, count: words * 4)
            if values.allSatisfy({ $0 == 0 }), gotCodes.allSatisfy({ $0 == 0 }), gotWords.allSatisfy({ $0 == 0 }) { continue }
            values.withUnsafeBufferPointer { v in
                codes.withUnsafeMutableBufferPointer { c in
                    wordsWant.withUnsafeMutableBufferPointer { w in format.quantizeChecked(v, codes: c, scaleWords: w) }
                }
            }
            guard gotCodes.elementsEqual(codes) else { return false }
            guard wordsWant.withUnsafeBytes({ gotWords.elementsEqual($0) }) else { return false }
        }
        return true
    }

    /// Quantises row `t` of `x` (element type) into row `slot` of `codes` and `scales`.
    private static func quantize(_ x: HostTensor, row t: Int, _ format: FP8RowFormat, codes: HostTensor, scales: HostTensor, at slot: Int) {
        let h = format.hidden, words = format.scaleWordsPerRow
        let values = (0..<h).map { BenchData.element(x, t * h + $0) }
        values.withUnsafeBufferPointer { v in
            format.quantizeChecked(
                v, codes: UnsafeMutableBufferPointer(start: (codes.storage + slot * h).assumingMemoryBound(to: UInt8.self), count: h),
                scaleWords: UnsafeMutableBufferPointer(start: (scales.storage + slot * words * 4).assumingMemoryBound(to: Int32.self), count: words))
        }
    }
}
