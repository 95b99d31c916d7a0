import ExpertParallel
import Foundation
import Testing

/// float32 → OCP e4m3 rounds to nearest even and saturates at ±448; NaN is always 0x7F. The
/// block scales follow the three modes. The GPU kernels (`ep_fp8.cuh`) must give the same bits.
@Suite("FP8 e4m3 conversion")
struct FP8E4M3Tests {
    struct Case: Sendable, CustomTestStringConvertible {
        var name: String, value: Float, code: UInt8
        var testDescription: String { name }
    }

    static let smallest = Float(sign: .plus, exponent: -9, significand: 1)   // 2^-9, code 0x01

    static let cases: [Case] = [
        Case(name: "+0", value: 0, code: 0x00),
        Case(name: "-0 keeps its sign", value: -0.0, code: 0x80),
        Case(name: "smallest subnormal 2^-9", value: smallest, code: 0x01),
        Case(name: "half of it is a tie: to even 0", value: smallest / 2, code: 0x00),
        Case(name: "negative half: to -0", value: -smallest / 2, code: 0x80),
        Case(name: "just above half rounds up", value: (smallest / 2).nextUp, code: 0x01),
        Case(name: "just below half rounds down", value: (smallest / 2).nextDown, code: 0x00),
        Case(name: "1.5 × 2^-9 ties up to even 2", value: smallest * 1.5, code: 0x02),
        Case(name: "2.5 × 2^-9 ties down to even 2", value: smallest * 2.5, code: 0x02),
        Case(name: "largest subnormal 7 × 2^-9", value: smallest * 7, code: 0x07),
        Case(name: "7.5 × 2^-9 ties up to the smallest normal", value: smallest * 7.5, code: 0x08),
        Case(name: "smallest normal 2^-6", value: smallest * 8, code: 0x08),
        Case(name: "a float subnormal rounds to 0", value: .leastNonzeroMagnitude, code: 0x00),
        Case(name: "a negative float subnormal rounds to -0", value: -.leastNonzeroMagnitude, code: 0x80),
        Case(name: "1.0", value: 1, code: 0x38),
        Case(name: "-1.0", value: -1, code: 0xB8),
        Case(name: "1.0625 ties down to even 1.0", value: 1.0625, code: 0x38),
        Case(name: "1.1875 ties up to even 1.25", value: 1.1875, code: 0x3A),
        Case(name: "248 ties up to even 256 (next binade)", value: 248, code: 0x78),
        Case(name: "416", value: 416, code: 0x7D),
        Case(name: "432 ties up to even 448", value: 432, code: 0x7E),
        Case(name: "448, the largest", value: 448, code: 0x7E),
        Case(name: "-448", value: -448, code: 0xFE),
        Case(name: "449 saturates", value: 449, code: 0x7E),
        Case(name: "464 (tie with 480) saturates", value: 464, code: 0x7E),
        Case(name: "480 saturates", value: 480, code: 0x7E),
        Case(name: "-1e6 saturates", value: -1e6, code: 0xFE),
        Case(name: "largest float saturates", value: .greatestFiniteMagnitude, code: 0x7E),
        Case(name: "+inf saturates", value: .infinity, code: 0x7E),
        Case(name: "-inf saturates", value: -.infinity, code: 0xFE),
        Case(name: "quiet NaN", value: .nan, code: 0x7F),
        Case(name: "negative NaN is the same code", value: -.nan, code: 0x7F),
        Case(name: "signalling NaN", value: Float(bitPattern: 0x7F80_0001), code: 0x7F),
        Case(name: "negative NaN with payload", value: Float(bitPattern: 0xFFFF_FFFF), code: 0x7F),
    ]

    @Test("float32 → e4m3 rounds to nearest even and saturates", arguments: cases)
    func encodes(_ c: Case) {
        let got = FP8E4M3.encode(c.value)
        #expect(got == c.code, "\(c.value) → 0x\(String(got, radix: 16)), expected 0x\(String(c.code, radix: 16))")
    }

    static let decodeCases: [(UInt8, Float)] = [
        (0x00, 0), (0x01, smallest), (0x07, smallest * 7), (0x08, smallest * 8), (0x38, 1),
        (0x3A, 1.25), (0x78, 256), (0x7E, 448), (0xFE, -448), (0xB8, -1),
    ]

    @Test("e4m3 → float32 is exact", arguments: decodeCases)
    func decodes(_ code: UInt8, _ value: Float) {
        #expect(FP8E4M3.decode(code).bitPattern == value.bitPattern)
    }

    @Test func negativeZeroAndNaNCodesDecode() {
        #expect(FP8E4M3.decode(0x80).bitPattern == (-0.0 as Float).bitPattern)
        #expect(FP8E4M3.decode(0x7F).isNaN && FP8E4M3.decode(0xFF).isNaN)
        #expect(FP8E4M3.isNaN(0x7F) && FP8E4M3.isNaN(0xFF) && !FP8E4M3.isNaN(0x7E) && !FP8E4M3.isNaN(0xFE))
    }

    @Test("every code survives decode then encode, except 0xFF (NaN, encoded as 0x7F)")
    func everyCodeRoundTrips() {
        let failures = (0...255).map(UInt8.init).filter { code in
            FP8E4M3.encode(FP8E4M3.decode(code)) != (code == 0xFF ? 0x7F : code)
        }
        #expect(failures.isEmpty, "codes that do not round-trip: \(failures)")
    }

    @Test("the encoder picks the nearest e4m3 value, ties to the even code, for 500k floats")
    func encoderMatchesTheNearestValue() {
        var patterns: [UInt32] = []
        // Every midpoint between neighbouring codes and the floats either side of it.
        for code in 0..<0x7E {
            let mid = (Double(FP8E4M3.decode(UInt8(code))) + Double(FP8E4M3.decode(UInt8(code + 1)))) / 2
            for delta in -2...2 { patterns.append(UInt32(Int(Float(mid).bitPattern) + delta)) }
        }
        // Every float's top 16 bits, with the low bits at the edges of their range.
        for high in UInt32(0)...0xFFFF {
            for low: UInt32 in [0, 1, 0x7FFF, 0x8000, 0xFFFF] { patterns.append(high << 16 | low) }
        }
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<(1 << 17) { patterns.append(UInt32.random(in: 0...UInt32.max, using: &generator)) }
        let failures = patterns.lazy.map { Float(bitPattern: $0) }.filter {
            FP8E4M3.encode($0) != FP8Reference.encode($0) || FP8E4M3.encode(-$0) != FP8Reference.encode(-$0)
        }
        #expect(Array(failures.prefix(5)).isEmpty, "first mismatches")
    }
}

@Suite("FP8 block scales and rows")
struct FP8ScalingTests {
    @Test func modesHaveTheirBlockSizesAndScaleBytes() {
        #expect(FP8ScaleMode.allCases.map(\.blockSize) == [128, 128, 32])
        #expect(FP8ScaleMode.allCases.map(\.scaleByteSize) == [4, 1, 1])
        #expect(FP8ScaleMode.allCases.map(\.isPowerOfTwo) == [false, true, true])
        #expect(FP8BlockScale.minimumAmax.bitPattern == 0x38D1_B717)
    }

    @Test("an all-zero block is scaled as if its amax were 1e-4", arguments: FP8ScaleMode.allCases)
    func zeroBlockUsesTheClamp(_ mode: FP8ScaleMode) throws {
        let scale = FP8BlockScale(amax: 0, mode: mode)
        if mode.isPowerOfTwo {
            let e = Int(ceil(log2(Double(Float(1e-4) / 448))))   // ceil(-22.095) = -22
            #expect(e == -22)
            #expect(scale.exponentByte == UInt8(127 + e))
            #expect(scale.scale == Float(sign: .plus, exponent: e, significand: 1))
            #expect(scale.multiplier == Float(sign: .plus, exponent: -e, significand: 1))
        } else {
            #expect(scale.scale == Float(1e-4) / 448 && scale.multiplier == 448 / Float(1e-4))
            #expect(scale.exponentByte == nil)
        }
        let format = try FP8RowFormat(mode: mode, hidden: mode.blockSize)
        let row = try format.quantize([Float](repeating: 0, count: mode.blockSize))
        #expect(row.codes.allSatisfy { $0 == 0 })
        #expect(try format.blockScales(scaleWords: row.scaleWords) == [scale.scale])
    }

    @Test("a NaN amax is scaled as no value (it trapped in the power-of-two modes)", arguments: FP8ScaleMode.allCases)
    func nanAmaxUsesTheClamp(_ mode: FP8ScaleMode) {
        #expect(FP8BlockScale(amax: .nan, mode: mode) == FP8BlockScale(amax: 0, mode: mode))
        #expect(FP8BlockScale(amax: -.nan, mode: mode) == FP8BlockScale(amax: 0, mode: mode))
        #expect(FP8BlockScale(amax: .signalingNaN, mode: mode) == FP8BlockScale(amax: 0, mode: mode))
    }

    static let powerOfTwoCases: [(amax: Float, byte: UInt8)] = [
        (448, 127), (896, 128), (224, 126), (447, 127), (Float(448).nextUp, 128), (449, 128), (3, 120),
    ]

    @Test("power-of-two scales: exact powers keep their exponent, others go up", arguments: powerOfTwoCases)
    func powerOfTwoScaleRoundsUp(_ amax: Float, _ byte: UInt8) {
        let scale = FP8BlockScale(amax: amax, mode: .ue8m0Block128)
        #expect(scale.exponentByte == byte)
        #expect(scale.scale * scale.multiplier == 1)
        #expect(FP8BlockScale(amax: amax, mode: .e8m0Block32) == scale)
    }

    @Test("scales and multipliers match Double: one rounding each, or the next power of two")
    func scalesMatchDouble() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<20_000 {
            let amax = Float(bitPattern: UInt32.random(in: 0x38D1_B717...0x7F7F_FFFF, using: &generator))
            let float32 = FP8BlockScale(amax: amax, mode: .float32Block128)
            #expect(float32.scale == Float(Double(amax) / 448) && float32.multiplier == Float(448 / Double(amax)), "amax \(amax)")
            let e = Int(ceil(log2(Double(Float(Double(amax) / 448)))))
            let power = FP8BlockScale(amax: amax, mode: .e8m0Block32)
            #expect(power.exponentByte == UInt8(e + 127) && power.scale == Float(pow(2.0, Double(e)))
                    && power.multiplier == Float(pow(2.0, Double(-e))), "amax \(amax)")
        }
    }

    @Test("a block of equal values: every code the same", arguments: FP8ScaleMode.allCases)
    func equalValues(_ mode: FP8ScaleMode) throws {
        let row = try FP8RowFormat(mode: mode, hidden: mode.blockSize).quantize([Float](repeating: 3, count: mode.blockSize))
        // float32: 3 × (448 / 3) rounds to 448; powers of two: 3 / 448 → 2^-7, 3 × 2^7 = 384.
        #expect(row.codes == [UInt8](repeating: mode.isPowerOfTwo ? 0x7C : 0x7E, count: mode.blockSize))
    }

    @Test("NaN does not count in amax and stays NaN; inf counts as the largest float", arguments: FP8ScaleMode.allCases)
    func nanAndInfinityInABlock(_ mode: FP8ScaleMode) throws {
        let format = try FP8RowFormat(mode: mode, hidden: mode.blockSize)
        var values = [Float](repeating: 0.5, count: mode.blockSize)
        values[0] = .nan
        values[1] = -2
        let withNaN = try format.quantize(values)
        #expect(withNaN.codes[0] == 0x7F)
        #expect(try format.blockScales(scaleWords: withNaN.scaleWords) == [FP8BlockScale(amax: 2, mode: mode).scale])
        values[0] = -.infinity
        let withInf = try format.quantize(values)
        #expect(withInf.codes[0] == 0xFE)
        #expect(try format.blockScales(scaleWords: withInf.scaleWords)
                == [FP8BlockScale(amax: .greatestFiniteMagnitude, mode: mode).scale])
        // Back to -(448 × scale): exactly the largest float in float32 mode, 1.75 × 2^128 = -inf in the others.
        #expect(try format.dequantize(withInf)[0] == (mode.isPowerOfTwo ? -.infinity : -.greatestFiniteMagnitude))
    }

    @Test("random rows match a reference computed in Double", arguments: FP8ScaleMode.allCases)
    func randomRowsMatchTheReference(_ mode: FP8ScaleMode) throws {
        let format = try FP8RowFormat(mode: mode, hidden: 7 * mode.blockSize)
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<20 {
            let row = FP8Reference.randomRow(count: format.hidden, using: &generator)
            let got = try format.quantize(row)
            let expected = FP8Reference.quantize(row, mode: mode)
            let first = got.codes.indices.first { got.codes[$0] != expected.codes[$0] }
            #expect(got == expected, "first differing code at \(String(describing: first)); scales \(got.scaleWords) vs \(expected.scaleWords)")
            let restored = try format.dequantize(got)
            let scales = try format.blockScales(scaleWords: got.scaleWords)
            for (i, x) in row.enumerated() {
                // Half a step of e4m3 at x: 2^-4 relative for normals, 2^-10 × scale for subnormals.
                let bound = max(Double(x.magnitude) / 16, Double(scales[i / mode.blockSize]) / 1024) * 1.0001
                #expect(abs(Double(restored[i]) - Double(x)) <= bound, "element \(i): \(x) → \(restored[i])")
            }
        }
    }

    @Test func scaleWordsPackFourExponentBytesLowByteFirst() throws {
        #expect(FP8RowFormat.packExponentBytes([1, 2, 3, 4, 5]).map { UInt32(bitPattern: $0) } == [0x0403_0201, 0x0000_0005])
        #expect(try FP8RowFormat.unpackExponentBytes(FP8RowFormat.packExponentBytes([9, 8, 7]), count: 3) == [9, 8, 7])
        #expect(try FP8RowFormat(mode: .float32Block128, hidden: 256).scaleWordsPerRow == 2)
        #expect(try FP8RowFormat(mode: .ue8m0Block128, hidden: 640).scaleWordsPerRow == 2)
        #expect(try FP8RowFormat(mode: .e8m0Block32, hidden: 96).scaleWordsPerRow == 1)
        let row = try FP8RowFormat(mode: .e8m0Block32, hidden: 160).quantize((0..<160).map { Float($0 / 32 + 1) * 448 })
        // amax 448 × k → e = ceil(log2 k): 0, 1, 2, 2, 3.
        #expect(row.scaleWords.map { UInt32(bitPattern: $0) } == [0x8181_807F, 0x0000_0082])
    }

    @Test("hidden must be a positive multiple of the block size", arguments: [
        (FP8ScaleMode.float32Block128, 100), (.ue8m0Block128, 96), (.e8m0Block32, 48), (.e8m0Block32, 0),
    ])
    func hiddenNotAMultipleIsRefused(_ mode: FP8ScaleMode, _ hidden: Int) {
        #expect(throws: EPError.invalidArgument(
            field: "hidden", value: "\(hidden)",
            requirement: "must be a positive multiple of \(mode.blockSize), the block size of FP8 scale mode \(mode)")) {
            try FP8RowFormat(mode: mode, hidden: hidden)
        }
    }

    @Test func rowOfTheWrongLengthIsRefused() throws {
        let format = try FP8RowFormat(mode: .e8m0Block32, hidden: 64)
        #expect(throws: EPError.invalidArgument(field: "row.count", value: "32", requirement: "must equal hidden (64)")) {
            try format.quantize([Float](repeating: 1, count: 32))
        }
    }

    @Test("quantize into caller buffers refuses a row, codes or scale words of the wrong count by name, and writes nothing")
    func buffersOfTheWrongCountAreRefused() throws {
        let format = try FP8RowFormat(mode: .float32Block128, hidden: 256)   // 2 blocks: 2 float32 scale words
        let right = [Float](repeating: 3, count: 256), short = [Float](repeating: 3, count: 128)
        var codes = [UInt8](repeating: 0xAA, count: 256), words = [Int32](repeating: 7, count: 2)
        var fewCodes = [UInt8](repeating: 0xAA, count: 255), manyWords = [Int32](repeating: 7, count: 3)
        func attempt(_ row: [Float], _ codes: inout [UInt8], _ words: inout [Int32]) throws(EPError) {
            try row.withUnsafeBufferPointer { (r) throws(EPError) in
                try codes.withUnsafeMutableBufferPointer { (c) throws(EPError) in
                    try words.withUnsafeMutableBufferPointer { (w) throws(EPError) in try format.quantize(r, codes: c, scaleWords: w) }
                }
            }
        }
        #expect(throws: EPError.invalidArgument(field: "row.count", value: "128", requirement: "must equal hidden (256)")) {
            try attempt(short, &codes, &words)
        }
        #expect(throws: EPError.invalidArgument(field: "codes.count", value: "255", requirement: "must equal hidden (256)")) {
            try attempt(right, &fewCodes, &words)
        }
        #expect(throws: EPError.invalidArgument(field: "scaleWords.count", value: "3", requirement: "must equal scaleWordsPerRow (2)")) {
            try attempt(right, &codes, &manyWords)
        }
        #expect(codes == [UInt8](repeating: 0xAA, count: 256) && words == [7, 7] && fewCodes.allSatisfy { $0 == 0xAA }
                && manyWords == [7, 7, 7], "nothing was written")
        try attempt(right, &codes, &words)
        #expect(FP8QuantizedRow(codes: codes, scaleWords: words) == (try format.quantize(right)))
    }
}

/// Straightforward references: the nearest e4m3 value by search, scales in Double.
enum FP8Reference {
    /// The 127 non-negative finite e4m3 values, by code.
    static let values: [Double] = (0...0x7E).map { Double(FP8E4M3.decode(UInt8($0))) }

    static func encode(_ x: Float) -> UInt8 {
        if x.isNaN { return 0x7F }
        let sign: UInt8 = x.sign == .minus ? 0x80 : 0
        let magnitude = min(Double(x.magnitude), 448)
        // The first code whose value is ≥ magnitude (values grow with the code), by bisection.
        var above = 0, end = values.count - 1
        while above < end {
            let middle = (above + end) / 2
            if values[middle] < magnitude { above = middle + 1 } else { end = middle }
        }
        guard above > 0 else { return sign }
        // The nearer of it and the code below; a tie goes to the even code.
        let up = values[above] - magnitude, down = magnitude - values[above - 1]
        let best = up < down || (up == down && above % 2 == 0) ? above : above - 1
        return sign | UInt8(best)
    }

    /// A float32 operation done in Double and rounded once to float (exact for ×, ÷ of floats).
    static func float(_ value: Double) -> Float { Float(value) }

    static func quantize(_ row: [Float], mode: FP8ScaleMode) -> FP8QuantizedRow {
        var codes: [UInt8] = [], scales: [Float] = [], bytes: [UInt8] = []
        for start in stride(from: 0, to: row.count, by: mode.blockSize) {
            let block = row[start..<start + mode.blockSize]
            let amax = min(max(block.filter { !$0.isNaN }.map(\.magnitude).max() ?? 0, 1e-4), .greatestFiniteMagnitude)
            let multiplier: Float
            if mode.isPowerOfTwo {
                let e = Int(ceil(log2(Double(float(Double(amax) / 448)))))
                bytes.append(UInt8(e + 127))
                multiplier = Float(pow(2.0, Double(-e)))
            } else {
                scales.append(float(Double(amax) / 448))
                multiplier = float(448 / Double(amax))
            }
            codes += block.map { encode(float(Double($0) * Double(multiplier))) }
        }
        let words = mode.isPowerOfTwo
            ? stride(from: 0, to: bytes.count, by: 4).map { start in
                bytes[start..<min(start + 4, bytes.count)].enumerated()
                    .reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * $1.offset) }
            }
            : scales.map(\.bitPattern)
        return FP8QuantizedRow(codes: codes, scaleWords: words.map { Int32(bitPattern: $0) })
    }

    /// Values over many magnitudes (blocks with amax below the 1e-4 clamp included), both signs.
    static func randomRow(count: Int, using generator: inout some RandomNumberGenerator) -> [Float] {
        let blockExponent = Float.random(in: -20...20, using: &generator)
        return (0..<count).map { _ in
            let magnitude = Float(pow(2.0, Double(blockExponent + Float.random(in: -12...2, using: &generator))))
            return Bool.random(using: &generator) ? magnitude : -magnitude
        }
    }
}
