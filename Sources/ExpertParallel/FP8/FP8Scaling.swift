/// How an FP8 row is scaled: one scale for each block of `blockSize` consecutive elements.
public enum FP8ScaleMode: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// Blocks of 128, float32 scales `amax / 448` (DeepSeek's recipe).
    case float32Block128
    /// Blocks of 128, power-of-two scales stored as UE8M0 exponent bytes (DeepEP's `use_ue8m0`).
    case ue8m0Block128
    /// Blocks of 32, power-of-two scales stored as E8M0 exponent bytes (OCP MXFP8).
    case e8m0Block32

    /// Elements that share one scale.
    public var blockSize: Int { self == .e8m0Block32 ? 32 : 128 }
    /// Bytes of one stored scale: 4 (float32) or 1 (an exponent byte, 4 packed into an int32).
    public var scaleByteSize: Int { self == .float32Block128 ? 4 : 1 }
    /// Whether the scales are powers of two (stored as exponent bytes).
    public var isPowerOfTwo: Bool { self != .float32Block128 }
    public var description: String { rawValue }
}

/// The scale of one block, computed from the block's `amax` (its largest |x|).
///
/// `amax` is first clamped to `[minimumAmax, Float.greatestFiniteMagnitude]` (NaN to
/// `minimumAmax`, as a block of no values): an all-zero block gets a finite scale, and a block holding ±infinity is scaled as if it held the largest float
/// (its infinities then convert to ±448, its finite values keep their precision).
/// - float32: `scale = amax / 448` and `multiplier = 448 / amax`, each one float32 division;
/// - powers of two: `scale = 2^e`, `multiplier = 2^-e`, where e is the smallest integer with
///   2^e ≥ the float32 value of `amax / 448` (read from its bits: exact powers of two keep their
///   exponent, any other value goes up to the next power), stored as the byte `e + 127`.
public struct FP8BlockScale: Sendable, Hashable {
    /// The lower clamp of `amax`, 1e-4 (float32 bits `0x38D1B717`).
    public static let minimumAmax: Float = 1e-4

    /// A decoded element times `scale` is the dequantised value.
    public var scale: Float
    /// An element times `multiplier` (one float32 rounding) is what is converted to e4m3.
    public var multiplier: Float
    /// `e + 127`, the UE8M0/E8M0 byte of `scale`, in the power-of-two modes; nil for float32.
    public var exponentByte: UInt8?

    public init(amax: Float, mode: FP8ScaleMode) {
        // A NaN amax counts as no value (as NaN elements do in `FP8RowFormat.amax`): clamped, not
        // passed through, whose exponent byte 0xFF + 1 would overflow.
        let amax = amax.isNaN ? Self.minimumAmax : min(max(amax, Self.minimumAmax), .greatestFiniteMagnitude)
        guard mode.isPowerOfTwo else {
            self.init(scale: amax / FP8E4M3.maxFinite, multiplier: FP8E4M3.maxFinite / amax, exponentByte: nil)
            return
        }
        // amax / 448 is a positive normal float (about 2^-22.1 … 2^119.2): its biased exponent,
        // plus one when any mantissa bit is set, is ceil(log2) + 127, in 105…247.
        let bits = (amax / FP8E4M3.maxFinite).bitPattern
        let byte = UInt8(bits >> 23) + (bits & 0x7F_FFFF != 0 ? 1 : 0)
        self.init(scale: Self.powerOfTwo(byte: byte), multiplier: Self.powerOfTwo(byte: 254 - byte), exponentByte: byte)
    }

    public init(scale: Float, multiplier: Float, exponentByte: UInt8?) {
        self.scale = scale
        self.multiplier = multiplier
        self.exponentByte = exponentByte
    }

    /// 2^(byte - 127) for a UE8M0/E8M0 byte; 0xFF (NaN in E8M0) gives NaN, 0 gives 2^-127.
    public static func powerOfTwo(byte: UInt8) -> Float {
        switch byte {
        case 0xFF: .nan
        case 0: Float(sign: .plus, exponent: -127, significand: 1)
        default: Float(bitPattern: UInt32(byte) << 23)
        }
    }
}

/// The FP8 layout of rows of `hidden` elements: one e4m3 byte per element, and per row the
/// scales of its `blocksPerRow` blocks, either `blocksPerRow` float32 values or the exponent
/// bytes packed 4 to an int32 word (block j in byte j % 4 of word j / 4, least significant byte
/// first; the last word's unused bytes are zero), `scaleWordsPerRow` 4-byte words either way.
public struct FP8RowFormat: Sendable, Hashable {
    public let mode: FP8ScaleMode
    public let hidden: Int

    /// Throws `invalidArgument` naming `hidden` unless it is a positive multiple of the block size.
    public init(mode: FP8ScaleMode, hidden: Int) throws(EPError) {
        guard hidden >= 1, hidden % mode.blockSize == 0 else {
            throw .invalidArgument(
                field: "hidden", value: "\(hidden)",
                requirement: "must be a positive multiple of \(mode.blockSize), the block size of FP8 scale mode \(mode)")
        }
        self.mode = mode
        self.hidden = hidden
    }

    public var blocksPerRow: Int { hidden / mode.blockSize }
    /// 4-byte scale words of one row: one float32 per block, or ⌈blocks / 4⌉ packed words.
    public var scaleWordsPerRow: Int { mode.isPowerOfTwo ? (blocksPerRow + 3) / 4 : blocksPerRow }

    /// The largest |x| of `values`, NaN ignored (as `fmaxf` does); 0 for no values. Unclamped.
    public static func amax(_ values: some Sequence<Float>) -> Float {
        var amax: Float = 0
        for value in values where value.magnitude > amax { amax = value.magnitude }  // false for NaN
        return amax
    }

    /// Quantises one row (`row.count == hidden`) into `codes` (`hidden`) and `scaleWords`
    /// (`scaleWordsPerRow`): per block, the scale of its amax, then `e4m3(x × multiplier)`.
    /// Another count throws `invalidArgument` naming `row.count`, `codes.count` or
    /// `scaleWords.count`, and writes nothing.
    public func quantize(
        _ row: UnsafeBufferPointer<Float>, codes: UnsafeMutableBufferPointer<UInt8>,
        scaleWords: UnsafeMutableBufferPointer<Int32>
    ) throws(EPError) {
        for (field, count, bound, name) in [("row.count", row.count, hidden, "hidden"), ("codes.count", codes.count, hidden, "hidden"),
                                            ("scaleWords.count", scaleWords.count, scaleWordsPerRow, "scaleWordsPerRow")]
        where count != bound {
            throw .invalidArgument(field: field, value: "\(count)", requirement: "must equal \(name) (\(bound))")
        }
        quantizeChecked(row, codes: codes, scaleWords: scaleWords)
    }

    /// `quantize(_:codes:scaleWords:)` of buffers whose counts the caller has made right.
    package func quantizeChecked(
        _ row: UnsafeBufferPointer<Float>, codes: UnsafeMutableBufferPointer<UInt8>,
        scaleWords: UnsafeMutableBufferPointer<Int32>
    ) {
        assert(row.count == hidden && codes.count == hidden && scaleWords.count == scaleWordsPerRow)
        if mode.isPowerOfTwo { scaleWords.update(repeating: 0) }  // the padding bytes stay zero
        for block in 0..<blocksPerRow {
            let elements = block * mode.blockSize..<(block + 1) * mode.blockSize
            let scale = FP8BlockScale(amax: Self.amax(row[elements]), mode: mode)
            for i in elements { codes[i] = FP8E4M3.encode(row[i] * scale.multiplier) }
            if let byte = scale.exponentByte {
                scaleWords[block / 4] |= Self.packed(byte, at: block)
            } else {
                scaleWords[block] = Int32(bitPattern: scale.scale.bitPattern)
            }
        }
    }

    /// Quantises one row; throws `invalidArgument` naming `row.count` unless it is `hidden`.
    public func quantize(_ row: [Float]) throws(EPError) -> FP8QuantizedRow {
        guard row.count == hidden else {
            throw .invalidArgument(field: "row.count", value: "\(row.count)", requirement: "must equal hidden (\(hidden))")
        }
        var codes = [UInt8](repeating: 0, count: hidden)
        var words = [Int32](repeating: 0, count: scaleWordsPerRow)
        row.withUnsafeBufferPointer { values in
            codes.withUnsafeMutableBufferPointer { c in
                words.withUnsafeMutableBufferPointer { w in quantizeChecked(values, codes: c, scaleWords: w) }
            }
        }
        return FP8QuantizedRow(codes: codes, scaleWords: words)
    }

    /// The scale of each block of a row, read from its stored scale words.
    public func blockScales(scaleWords: [Int32]) throws(EPError) -> [Float] {
        guard scaleWords.count == scaleWordsPerRow else {
            throw .invalidArgument(field: "scaleWords.count", value: "\(scaleWords.count)",
                                   requirement: "must equal scaleWordsPerRow (\(scaleWordsPerRow))")
        }
        guard mode.isPowerOfTwo else { return scaleWords.map { Float(bitPattern: UInt32(bitPattern: $0)) } }
        return try Self.unpackExponentBytes(scaleWords, count: blocksPerRow).map(FP8BlockScale.powerOfTwo(byte:))
    }

    /// `decode(code) × scale` for every element (one float32 rounding each): for tests and checks.
    public func dequantize(_ row: FP8QuantizedRow) throws(EPError) -> [Float] {
        guard row.codes.count == hidden else {
            throw .invalidArgument(field: "codes.count", value: "\(row.codes.count)", requirement: "must equal hidden (\(hidden))")
        }
        let scales = try blockScales(scaleWords: row.scaleWords)
        return row.codes.indices.map { FP8E4M3.decode(row.codes[$0]) * scales[$0 / mode.blockSize] }
    }

    /// Packs exponent bytes 4 to a word, byte j into bits 8 (j % 4) of word j / 4; the last
    /// word's unused bytes are zero.
    public static func packExponentBytes(_ bytes: [UInt8]) -> [Int32] {
        var words = [Int32](repeating: 0, count: (bytes.count + 3) / 4)
        for (j, byte) in bytes.enumerated() { words[j / 4] |= packed(byte, at: j) }
        return words
    }

    /// Exponent byte j in its place within word j / 4.
    private static func packed(_ byte: UInt8, at j: Int) -> Int32 {
        Int32(bitPattern: UInt32(byte) << (8 * (j % 4)))
    }

    /// The first `count` exponent bytes of packed words; `count` in 0...4 × `words.count`, else
    /// `invalidArgument` naming it.
    public static func unpackExponentBytes(_ words: [Int32], count: Int) throws(EPError) -> [UInt8] {
        guard count >= 0, count <= 4 * words.count else {
            throw .invalidArgument(field: "count", value: "\(count)", requirement: "must be in 0...\(4 * words.count) (4 bytes in each of the \(words.count) words)")
        }
        return (0..<count).map { UInt8(truncatingIfNeeded: UInt32(bitPattern: words[$0 / 4]) >> (8 * ($0 % 4))) }
    }
}

/// One quantised row: its e4m3 codes and its scale words (see `FP8RowFormat`).
public struct FP8QuantizedRow: Sendable, Hashable {
    public var codes: [UInt8]
    public var scaleWords: [Int32]

    public init(codes: [UInt8], scaleWords: [Int32]) {
        self.codes = codes
        self.scaleWords = scaleWords
    }
}
