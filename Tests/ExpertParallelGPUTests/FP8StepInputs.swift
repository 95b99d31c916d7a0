import ExpertParallel

/// FP8 steps' inputs: what the standard `StepInputs` gives (routing, weights, expert outputs),
/// with rows made for FP8. Quantise: element rows whose blocks span many magnitudes (each block
/// a random power of two times values in [-1, 1)), so that scales differ block to block. Pass-
/// through: random e4m3 bytes (the NaN codes 0x7F and 0xFF among them) and random scale words,
/// which dispatch must move unchanged whatever they hold.
extension StepInputs {
    init(fp8 config: GroupConfig, tokens counts: [Int], seed: UInt64, minusOneRate: Float = 0.1, skew: Double = 0) throws {
        try self.init(config: config, tokens: counts, seed: seed, minusOneRate: minusOneRate, skew: skew)
        let fp8 = config.fp8!, format = config.fp8Format!
        var random = RandomRouting(seed: seed ^ 0xF8F8_F8F8)
        switch fp8.source {
        case .quantize:
            // f16 holds magnitudes 2^-24 … 65504; bf16 and f32 take 2^-30 … 2^30.
            let range = config.elementType == .f16 ? 14 : 30
            tokens = try counts.map { b in
                var values = [Float](repeating: 0, count: b * config.hidden)
                for block in 0..<(values.count / fp8.scales.blockSize) {
                    let factor = Float(sign: .plus, exponent: Int(random.next() % UInt64(2 * range + 1)) - range, significand: 1)
                    for i in 0..<fp8.scales.blockSize { values[block * fp8.scales.blockSize + i] = (random.unit() * 2 - 1) * factor }
                }
                return try HostTensor(elements: values, config.elementType, [b, config.hidden])
            }
        case .passThrough:
            tokens = try counts.map { b in
                let codes = try HostTensor(.e4m3, [b, config.hidden])
                try codes.copy(from: (0..<(b * config.hidden)).map { _ in UInt8(truncatingIfNeeded: random.next()) })
                return codes
            }
            scales = try counts.map { b in
                let words = try HostTensor(fp8.scaleType, [b, format.scaleWordsPerRow])
                try words.copy(from: (0..<(b * format.scaleWordsPerRow)).map { _ in UInt32(truncatingIfNeeded: random.next()) })
                return words
            }
        }
    }
}

extension HostTensor {
    /// `values` stored as `type` (bf16 and f16 rounded to nearest even, as ElementConversion does).
    convenience init(elements values: [Float], _ type: DataType, _ shape: [Int]) throws {
        try self.init(type, shape)
        for (i, v) in values.enumerated() {
            switch type {
            case .bf16: self[as: UInt16.self, i] = ElementConversion.floatToBF16(v)
            case .f16: self[as: UInt16.self, i] = ElementConversion.floatToF16(v)
            default: self[as: Float.self, i] = v
            }
        }
    }
}

/// The edge values of docs/fp8.md, one block each (padded with the block's first value; a row
/// holds `hidden / blockSize` of them, cycling): zeros of both signs, float32 subnormals and a
/// block whose amax sits at, just below and just above the 1e-4 clamp, e4m3 subnormals beside
/// ±448 (and the 464 tie, and 480), overflow and infinities, NaN among finite values, a block of
/// equal values (3.0), ties between e4m3 codes, and an all-NaN block.
enum FP8EdgeValues {
    static let blocks: [[Float]] = [
        [0, -0.0],
        [Float.leastNonzeroMagnitude, -Float.leastNormalMagnitude, 1e-39],
        [1e-4, -5e-5, 2.5e-5],
        [Float(bitPattern: 0x38D1_B716), 1e-5],   // just below the clamp
        [Float(bitPattern: 0x38D1_B718), -1e-4],  // just above it
        [448, -448, 0.5, 0.001953125, 0.0009765625, -0.0029296875, 0.013671875],
        [464, -464, 480, 1, -1],
        [1e30, -.infinity, .infinity, 7, -3],
        [.nan, 2, -.nan, -5, Float(bitPattern: 0x7FC0_0001)],
        [3],
        [1.0625, 1.1875, -1.0625, 0.01708984375, 0.0146484375],
        [.nan],
    ]

    /// A `[rows, hidden]` tensor of `type`: row r starts at edge block r (so every block meets every
    /// position of a row over a few rows), each block shuffled by its row.
    static func rows(_ rows: Int, hidden: Int, blockSize: Int, _ type: DataType) throws -> HostTensor {
        var values: [Float] = []
        for r in 0..<rows {
            for j in 0..<(hidden / blockSize) {
                let pattern = blocks[(r + j) % blocks.count]
                values += (0..<blockSize).map { pattern[($0 * 7 + r) % pattern.count] }
            }
        }
        return try HostTensor(elements: values, type, [rows, hidden])
    }
}
