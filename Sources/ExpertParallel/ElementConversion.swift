/// Conversions between float32 and the 16-bit payload types, by bit arithmetic so that the
/// GPU kernels can do exactly the same (round to nearest even; NaN stays NaN).
public enum ElementConversion {
    @inline(__always)
    public static func bf16ToFloat(_ bits: UInt16) -> Float { Float(bitPattern: UInt32(bits) << 16) }

    @inline(__always)
    public static func floatToBF16(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        if value.isNaN { return UInt16(truncatingIfNeeded: bits >> 16) | 0x0040 }
        let roundingBias: UInt32 = 0x7FFF + ((bits >> 16) & 1)
        return UInt16(truncatingIfNeeded: (bits &+ roundingBias) >> 16)
    }

    @inline(__always)
    public static func f16ToFloat(_ bits: UInt16) -> Float { Float(Float16(bitPattern: bits)) }

    @inline(__always)
    public static func floatToF16(_ value: Float) -> UInt16 { Float16(value).bitPattern }

    /// Reads element `index` of a payload row as float32.
    @inline(__always)
    static func load(_ base: UnsafeRawPointer, _ index: Int, _ type: DataType) -> Float {
        switch type {
        case .bf16: bf16ToFloat(base.load(fromByteOffset: index * 2, as: UInt16.self))
        case .f16: f16ToFloat(base.load(fromByteOffset: index * 2, as: UInt16.self))
        case .f32: base.load(fromByteOffset: index * 4, as: Float.self)
        default: preconditionFailure("load: \(type) is not a floating payload type")
        }
    }

    /// Writes `value` rounded once to `type` as element `index`.
    @inline(__always)
    static func store(_ value: Float, _ base: UnsafeMutableRawPointer, _ index: Int, _ type: DataType) {
        switch type {
        case .bf16: base.storeBytes(of: floatToBF16(value), toByteOffset: index * 2, as: UInt16.self)
        case .f16: base.storeBytes(of: floatToF16(value), toByteOffset: index * 2, as: UInt16.self)
        case .f32: base.storeBytes(of: value, toByteOffset: index * 4, as: Float.self)
        default: preconditionFailure("store: \(type) is not a floating payload type")
        }
    }

    /// `acc[i] = acc[i].addingProduct(weight, row[i])` for every element of a payload row: the
    /// combine's one step, with the element type decided once per row rather than per element.
    static func accumulate(_ acc: UnsafeMutableBufferPointer<Float>, weight: Float, row: UnsafeRawPointer, _ type: DataType) {
        // With weight 1 the product is exact, so the fused step is a plain sum (and needs no
        // call to fmaf on CPUs built without FMA instructions).
        @inline(__always) func step(_ i: Int, _ value: Float) {
            acc[i] = weight == 1 ? acc[i] + value : acc[i].addingProduct(weight, value)
        }
        switch type {
        case .bf16:
            let values = row.assumingMemoryBound(to: UInt16.self)
            for i in acc.indices { step(i, bf16ToFloat(values[i])) }
        case .f16:
            let values = row.assumingMemoryBound(to: UInt16.self)
            for i in acc.indices { step(i, f16ToFloat(values[i])) }
        case .f32:
            let values = row.assumingMemoryBound(to: Float.self)
            for i in acc.indices { step(i, values[i]) }
        default: preconditionFailure("accumulate: \(type) is not a floating payload type")
        }
    }

    /// Writes a row of float32 sums, each rounded once to `type`.
    static func storeRow(_ values: UnsafeMutableBufferPointer<Float>, to row: UnsafeMutableRawPointer, _ type: DataType) {
        switch type {
        case .bf16:
            let out = row.assumingMemoryBound(to: UInt16.self)
            for i in values.indices { out[i] = floatToBF16(values[i]) }
        case .f16:
            let out = row.assumingMemoryBound(to: UInt16.self)
            for i in values.indices { out[i] = floatToF16(values[i]) }
        case .f32:
            let out = row.assumingMemoryBound(to: Float.self)
            for i in values.indices { out[i] = values[i] }
        default: preconditionFailure("storeRow: \(type) is not a floating payload type")
        }
    }
}
