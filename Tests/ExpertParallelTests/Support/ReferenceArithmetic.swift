import ExpertParallel

/// The test suite's own element conversions, written independently of `ElementConversion`:
/// float32 → bf16 keeps the upper 16 bits and rounds on the lower 16 (above half: up; exactly
/// half: to the even neighbour). f16 uses the standard library's `Float16`, which rounds to
/// nearest even.
enum ReferenceArithmetic {
    static func bf16Bits(_ x: Float) -> UInt16 {
        precondition(!x.isNaN, "the reference never rounds NaN")
        let bits = x.bitPattern
        let upper = bits >> 16, lower = bits & 0xFFFF
        let up = lower > 0x8000 || (lower == 0x8000 && upper & 1 == 1)
        return UInt16(upper + (up ? 1 : 0))   // a carry into the exponent gives the next binade or inf
    }

    static func bf16Value(_ bits: UInt16) -> Float { Float(bitPattern: UInt32(bits) << 16) }

    /// `x` rounded once to `type` and read back as float32.
    static func rounded(_ x: Float, to type: DataType) -> Float {
        switch type {
        case .bf16: bf16Value(bf16Bits(x))
        case .f16: Float(Float16(x))
        case .f32: x
        default: preconditionFailure("\(type) is not a floating payload type")
        }
    }

    /// The bytes of `x` rounded once to `type`.
    static func encode(_ x: Float, as type: DataType) -> [UInt8] {
        switch type {
        case .bf16: withUnsafeBytes(of: bf16Bits(x)) { Array($0) }
        case .f16: withUnsafeBytes(of: Float16(x).bitPattern) { Array($0) }
        case .f32: withUnsafeBytes(of: x.bitPattern) { Array($0) }
        default: preconditionFailure("\(type) is not a floating payload type")
        }
    }

    /// Element `index` of a row of `type` as float32.
    static func decode(_ bytes: UnsafeRawBufferPointer, _ index: Int, _ type: DataType) -> Float {
        switch type {
        case .bf16: bf16Value(bytes.loadUnaligned(fromByteOffset: index * 2, as: UInt16.self))
        case .f16: Float(Float16(bitPattern: bytes.loadUnaligned(fromByteOffset: index * 2, as: UInt16.self)))
        case .f32: bytes.loadUnaligned(fromByteOffset: index * 4, as: Float.self)
        default: preconditionFailure("\(type) is not a floating payload type")
        }
    }

    static func decodeRow(_ bytes: ArraySlice<UInt8>, _ hidden: Int, _ type: DataType) -> [Float] {
        bytes.withUnsafeBytes { raw in (0..<hidden).map { decode(raw, $0, type) } }
    }

    static func encodeRow(_ values: [Float], as type: DataType) -> [UInt8] {
        values.flatMap { encode($0, as: type) }
    }

    static func roundUp(_ value: Int, _ multiple: Int) -> Int { (value + multiple - 1) / multiple * multiple }
}
