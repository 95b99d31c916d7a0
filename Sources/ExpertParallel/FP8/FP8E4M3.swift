/// OCP FP8 E4M3 (`float8_e4m3fn` in PyTorch): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
/// bits. No infinities; `S.1111.111` is NaN, so the largest finite value is 448 (`0x7E`).
/// Subnormals (exponent field 0) are `mantissa × 2^-9`, the smallest 2^-9 (`0x01`).
///
/// The conversion from float32 is the one the GPU kernels use (`ep_fp8.cuh`, bit for bit):
/// round to nearest, ties to even, saturating at ±448 (`cvt.rn.satfinite.e4m3x2.f32`):
/// - a finite value beyond ±448 and ±infinity give ±448;
/// - a value that rounds to zero keeps its sign (`-0.0` and tiny negatives give `0x80`);
/// - every NaN, whatever its sign or payload, gives `0x7F`. The sign of a NaN that comes out of
///   an arithmetic step is not the same on every CPU and GPU, so it is not kept.
public enum FP8E4M3 {
    /// The largest finite value, 448.
    public static let maxFinite: Float = 448
    /// The code of +448; `0xFE` is −448.
    public static let maxFiniteCode: UInt8 = 0x7E
    /// The code every NaN converts to.
    public static let nanCode: UInt8 = 0x7F

    /// `value` rounded to nearest even, saturated to ±448; NaN gives `nanCode`.
    public static func encode(_ value: Float) -> UInt8 {
        if value.isNaN { return nanCode }
        let sign: UInt8 = value.sign == .minus ? 0x80 : 0
        let magnitude = value.magnitude
        // Everything from 448 up rounds to 448 or to 480 (not finite): satfinite gives 448.
        if magnitude >= maxFinite { return sign | maxFiniteCode }
        if magnitude == 0 { return sign }
        // The spacing of e4m3 values near `magnitude` is 2^quantum: 2^(exponent - 3) in the
        // normal range (exponent ≥ -6), 2^-9 among the subnormals.
        let quantum = max(magnitude.exponent - 3, -9)
        // magnitude / 2^quantum is exact (a power-of-two scaling into [0, 16)): the only
        // rounding is this one, to an integer count of steps.
        let scaled = magnitude * Float(sign: .plus, exponent: -quantum, significand: 1)
        var steps = Int(scaled.rounded(.toNearestOrEven))
        var exponent = quantum
        if steps == 16 {  // rounded up into the next binade
            steps = 8
            exponent += 1
        }
        // steps < 8 only with quantum -9: a subnormal, whose code is the step count itself.
        if steps < 8 { return sign | UInt8(steps) }
        // A normal value steps × 2^exponent with 8 ≤ steps < 16: unbiased exponent exponent + 3,
        // stored with bias 7, and the 3 mantissa bits steps - 8. (steps ≤ 14 here: below 448.)
        return sign | UInt8((exponent + 10) << 3) | UInt8(steps - 8)
    }

    /// The exact float32 value of `code`; `0x7F` and `0xFF` give a quiet NaN.
    public static func decode(_ code: UInt8) -> Float {
        let exponentField = Int(code >> 3) & 0xF
        let mantissa = Int(code & 0x7)
        if exponentField == 0xF && mantissa == 0x7 { return .nan }
        let magnitude = exponentField == 0
            ? Float(mantissa) * Float(sign: .plus, exponent: -9, significand: 1)
            : Float(8 + mantissa) * Float(sign: .plus, exponent: exponentField - 10, significand: 1)
        return code & 0x80 != 0 ? -magnitude : magnitude
    }

    /// Whether `code` is one of the two NaN codes (`0x7F`, `0xFF`).
    public static func isNaN(_ code: UInt8) -> Bool { code & 0x7F == 0x7F }
}
