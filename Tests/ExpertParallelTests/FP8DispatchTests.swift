import ExpertParallel
import Testing

/// FP8 dispatch on the CPU backend (the oracle): every received row is the e4m3 quantisation of
/// the source row a plain dispatch puts in the same slot, with its scale words beside it
/// (quantised in the dispatch, or passed through from the caller), in every layout and scale
/// mode; padding rows are zero; wrong scales and hidden sizes are named errors.
@Suite("FP8 dispatch on the CPU backend")
struct FP8DispatchTests {
    static let layouts: [(Algorithm, Layout)] = [
        (.lowLatency, .expertMajor), (.lowLatency, .rankMajor), (.highThroughput, .flat), (.highThroughput, .expertMajorPadded(alignment: 4)),
    ]

    /// One step's inputs: bf16 rows with a wide range (so that scales differ per block), routing.
    struct Inputs {
        var tokens: [HostTensor]
        var routing: [HostTensor]
        var weights: [HostTensor]
    }

    static func inputs(_ config: GroupConfig, seed: UInt64, tokens: Int) throws -> Inputs {
        var random = RandomRouting(seed: seed)
        var result = Inputs(tokens: [], routing: [], weights: [])
        for _ in 0..<config.ranks {
            let x = try HostTensor(.bf16, [tokens, config.hidden])
            for i in 0..<x.elementCount {
                let magnitude = Float(1 << (i / config.hidden % 5)) * (random.unit() * 2 - 1) * 37
                x[as: UInt16.self, i] = ElementConversion.floatToBF16(magnitude)
            }
            let idx = try HostTensor(.i32, [tokens, config.topK])
            try idx.copy(from: random.experts(tokens: tokens, topK: config.topK, experts: config.experts, skew: 0))
            let w = try HostTensor(.f32, [tokens, config.topK])
            try w.copy(from: random.weights(tokens * config.topK))
            result.tokens.append(x)
            result.routing.append(idx)
            result.weights.append(w)
        }
        return result
    }

    /// Runs update + dispatch on `config`; returns each rank's received rows, scales and layout.
    static func dispatch(_ config: GroupConfig, _ inputs: Inputs, tokens: [HostTensor]? = nil, scales: [HostTensor]? = nil)
        throws -> [(rows: HostTensor, scales: HostTensor?, info: LayoutInfo)]
    {
        let group = try HostGroup(config)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: inputs.routing.map(\.ref))
        let rows = try (0..<config.ranks).map { _ in try HostTensor(config.receiveElementType, config.receiveShape) }
        let received = try (0..<config.ranks).map { _ in try config.receiveScalesShape.map { try HostTensor(config.fp8!.scaleType, $0) } }
        let routing = config.receiveRoutingShape
        let idx = try (0..<config.ranks).map { _ in try routing.map { try HostTensor(.i32, $0) } }
        let weights = try (0..<config.ranks).map { _ in try routing.map { try HostTensor(.f32, $0) } }
        let ins = (0..<config.ranks).map { r in
            DispatchInput(tokens: (tokens ?? inputs.tokens)[r].ref, topkWeights: inputs.weights[r].ref, scales: scales?[r].ref)
        }
        let outs = (0..<config.ranks).map { r in
            DispatchOutput(tokens: rows[r].ref, topkIdx: idx[r]?.ref, topkWeights: weights[r]?.ref, scales: received[r]?.ref)
        }
        try group.dispatch(handle, ins, into: outs)
        return try (0..<config.ranks).map { r in (rows[r], received[r], try group.layoutInfo(handle, rank: r)) }
    }

    /// The slots a dispatch wrote (received rows; HT expert-major: padding included).
    static func rowsInUse(_ config: GroupConfig, _ info: LayoutInfo) -> [Int] {
        switch config.layout {
        case .expertMajor: (0..<config.localExperts).flatMap { e in info.expertOffsets[e]..<(info.expertOffsets[e] + info.expertCounters[e]) }
        case .rankMajor: (0..<config.ranks).flatMap { s in (s * config.maxTokensPerRank)..<(s * config.maxTokensPerRank + info.sourceRankCounters[s]) }
        case .flat, .expertMajorPadded: Array(0..<info.receivedTotal)
        }
    }

    @Test("quantised and passed-through rows equal the quantisation of the rows a plain dispatch delivers",
          arguments: layouts.indices, FP8ScaleMode.allCases)
    func receivedRowsAreTheQuantisedSourceRows(layoutIndex: Int, mode: FP8ScaleMode) throws {
        let (algorithm, layout) = Self.layouts[layoutIndex]
        let plain = GroupConfig(algorithm: algorithm, ranks: 3, experts: 6, topK: 2, hidden: 256, elementType: .bf16,
                                maxTokensPerRank: 5, layout: layout)
        var fp8 = plain
        fp8.fp8 = FP8Dispatch(scales: mode)
        let inputs = try Self.inputs(plain, seed: 7, tokens: 5)
        let format = try FP8RowFormat(mode: mode, hidden: plain.hidden)
        let reference = try Self.dispatch(plain, inputs)
        let quantised = try Self.dispatch(fp8, inputs)

        // Pass-through: the caller's own e4m3 rows and scales (quantised here) arrive unchanged.
        var passThrough = fp8
        passThrough.fp8 = FP8Dispatch(scales: mode, source: .passThrough)
        var codes: [HostTensor] = [], scales: [HostTensor] = []
        for x in inputs.tokens {
            let rows = x.shape[0], c = try HostTensor(.e4m3, [rows, plain.hidden]), s = try HostTensor(mode == .float32Block128 ? .f32 : .i32, [rows, format.scaleWordsPerRow])
            for t in 0..<rows {
                let row = (0..<plain.hidden).map { ElementConversion.bf16ToFloat(x[as: UInt16.self, t * plain.hidden + $0]) }
                let q = try format.quantize(row)
                for (i, code) in q.codes.enumerated() { c[as: UInt8.self, t * plain.hidden + i] = code }
                for (i, word) in q.scaleWords.enumerated() { s[as: Int32.self, t * format.scaleWordsPerRow + i] = word }
            }
            codes.append(c)
            scales.append(s)
        }
        let passed = try Self.dispatch(passThrough, inputs, tokens: codes, scales: scales)

        for r in 0..<plain.ranks {
            #expect(quantised[r].info == reference[r].info && passed[r].info == reference[r].info, "rank \(r): layout info")
            let used = Self.rowsInUse(plain, reference[r].info)
            #expect(!used.isEmpty || reference[r].info.receivedTotal == 0)
            for slot in used {
                let row = (0..<plain.hidden).map { ElementConversion.bf16ToFloat(reference[r].rows[as: UInt16.self, slot * plain.hidden + $0]) }
                let want = try format.quantize(row)
                let padding = row.allSatisfy { $0 == 0 } && plain.isExpertMajorHT
                for got in [quantised[r], passed[r]] {
                    let gotCodes = (0..<plain.hidden).map { got.rows[as: UInt8.self, slot * plain.hidden + $0] }
                    let gotWords = (0..<format.scaleWordsPerRow).map { got.scales![as: Int32.self, slot * format.scaleWordsPerRow + $0] }
                    if padding && gotWords.allSatisfy({ $0 == 0 }) {
                        #expect(gotCodes.allSatisfy { $0 == 0 }, "rank \(r) padding slot \(slot): codes")
                        continue
                    }
                    #expect(gotCodes == want.codes, "rank \(r) slot \(slot): codes")
                    #expect(gotWords == want.scaleWords, "rank \(r) slot \(slot): scale words")
                }
            }
        }
    }

    @Test("the scales and hidden size of an FP8 group are checked by name, before anything moves")
    func wrongScalesAreNamed() throws {
        var config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 128, elementType: .bf16, maxTokensPerRank: 2)
        config.fp8 = FP8Dispatch(scales: .ue8m0Block128, source: .passThrough)
        let inputs = try Self.inputs(config, seed: 3, tokens: 2)
        let codes = try inputs.tokens.map { _ in try HostTensor(.e4m3, [2, 128]) }
        #expect(throws: EPError.self) { _ = try Self.dispatch(config, inputs, tokens: codes, scales: nil) }
        let wrong = try inputs.tokens.map { _ in try HostTensor(.f32, [2, 1]) }   // ue8m0 scales are int32 words
        do {
            _ = try Self.dispatch(config, inputs, tokens: codes, scales: wrong)
            Issue.record("float32 scales were accepted for ue8m0")
        } catch let error as EPError {
            #expect("\(error)".contains("scales"), "\(error)")
        }
        var odd = config
        odd.hidden = 96
        #expect(throws: EPError.self) { _ = try odd.validated() }
        do {
            _ = try odd.validated()
        } catch {
            #expect("\(error)".contains("hidden") && "\(error)".contains("128"), "\(error)")
        }
        var u8 = config
        u8.elementType = .u8
        #expect(throws: EPError.self) { _ = try u8.validated() }
    }

    @Test("combine after an FP8 dispatch runs in the element type")
    func combineAfterFP8DispatchRuns() throws {
        var config = GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 128, elementType: .bf16, maxTokensPerRank: 3)
        config.fp8 = FP8Dispatch(scales: .float32Block128)
        let inputs = try Self.inputs(config, seed: 5, tokens: 3)
        let group = try HostGroup(config)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: inputs.routing.map(\.ref))
        let rows = try (0..<2).map { _ in try HostTensor(.e4m3, config.receiveShape) }
        let scales = try (0..<2).map { _ in try HostTensor(.f32, config.receiveScalesShape!) }
        let idx = try (0..<2).map { _ in try HostTensor(.i32, config.receiveRoutingShape!) }, w = try (0..<2).map { _ in try HostTensor(.f32, config.receiveRoutingShape!) }
        try group.dispatch(handle, (0..<2).map { DispatchInput(tokens: inputs.tokens[$0].ref, topkWeights: inputs.weights[$0].ref) },
                           into: (0..<2).map { DispatchOutput(tokens: rows[$0].ref, topkIdx: idx[$0].ref, topkWeights: w[$0].ref, scales: scales[$0].ref) })
        let y = try (0..<2).map { _ in try HostTensor(.bf16, config.receiveShape) }
        let out = try (0..<2).map { _ in try HostTensor(.bf16, [3, 128]) }
        try group.combine(handle, (0..<2).map { CombineInput(expertOutputs: y[$0].ref) }, into: (0..<2).map { CombineOutput(tokens: out[$0].ref) })
        #expect(out.allSatisfy { $0.bytes().allSatisfy { $0 == 0 } }, "zero expert outputs combine to zero")
        // An e4m3 tensor is not a combine input of this group.
        #expect(throws: EPError.self) {
            try group.combine(handle, (0..<2).map { CombineInput(expertOutputs: rows[$0].ref) }, into: (0..<2).map { CombineOutput(tokens: out[$0].ref) })
        }
    }
}
