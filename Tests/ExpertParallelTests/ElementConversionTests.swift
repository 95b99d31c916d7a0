import ExpertParallel
import PropertyBased
import Testing

/// float32 → bf16 rounds to nearest, ties to even, overflows to infinity and keeps NaN a NaN;
/// the GPU kernels use the same bit arithmetic, so these are checked bit for bit.
@Suite("Element conversion")
struct ElementConversionTests {
    struct Case: Sendable, CustomTestStringConvertible {
        var name: String, float: UInt32, bf16: UInt16
        var testDescription: String { name }
    }

    static let roundingCases: [Case] = [
        Case(name: "1.0 is exact", float: 0x3F80_0000, bf16: 0x3F80),
        Case(name: "-3.0 is exact", float: 0xC040_0000, bf16: 0xC040),
        Case(name: "just below half an ulp rounds down", float: 0x3F80_7FFF, bf16: 0x3F80),
        Case(name: "exactly half, even below: stays", float: 0x3F80_8000, bf16: 0x3F80),
        Case(name: "just above half rounds up", float: 0x3F80_8001, bf16: 0x3F81),
        Case(name: "exactly half, odd below: up to even", float: 0x3F81_8000, bf16: 0x3F82),
        Case(name: "negative tie, odd below: away from zero to even", float: 0xBF81_8000, bf16: 0xBF82),
        Case(name: "negative tie, even below: toward zero", float: 0xBF82_8000, bf16: 0xBF82),
        Case(name: "carry into the exponent (1.9999999 → 2)", float: 0x3FFF_FFFF, bf16: 0x4000),
        Case(name: "53.625 → 53.5 (tie to even)", float: Float(53.625).bitPattern, bf16: 0x4256),
        Case(name: "largest float overflows to +inf", float: 0x7F7F_FFFF, bf16: 0x7F80),
        Case(name: "largest negative float overflows to -inf", float: 0xFF7F_FFFF, bf16: 0xFF80),
        Case(name: "tie above the largest bf16 overflows to inf", float: 0x7F7F_8000, bf16: 0x7F80),
        Case(name: "just below that tie stays the largest bf16", float: 0x7F7F_7FFF, bf16: 0x7F7F),
        Case(name: "+inf", float: 0x7F80_0000, bf16: 0x7F80),
        Case(name: "-inf", float: 0xFF80_0000, bf16: 0xFF80),
        Case(name: "+0", float: 0x0000_0000, bf16: 0x0000),
        Case(name: "-0", float: 0x8000_0000, bf16: 0x8000),
        Case(name: "subnormal tie, even below: to zero", float: 0x0000_8000, bf16: 0x0000),
        Case(name: "subnormal tie, odd below: up", float: 0x0001_8000, bf16: 0x0002),
        Case(name: "largest subnormal rounds to the smallest normal", float: 0x007F_FFFF, bf16: 0x0080),
    ]

    @Test("float32 → bf16 rounds to nearest even", arguments: roundingCases)
    func roundsToNearestEven(_ c: Case) {
        let got = ElementConversion.floatToBF16(Float(bitPattern: c.float))
        #expect(got == c.bf16, "0x\(String(c.float, radix: 16)) → 0x\(String(got, radix: 16)), expected 0x\(String(c.bf16, radix: 16))")
    }

    @Test("NaN stays NaN with its sign, even when its payload is only in the low 16 bits", arguments: [
        UInt32(0x7FC0_0000), 0x7F80_0001, 0x7F80_FFFF, 0xFF80_0001, 0xFFFF_FFFF, 0x7FFF_FFFF,
    ])
    func nanStaysNaN(_ bits: UInt32) {
        let got = ElementConversion.floatToBF16(Float(bitPattern: bits))
        #expect(got & 0x7F80 == 0x7F80 && got & 0x007F != 0, "0x\(String(bits, radix: 16)) → 0x\(String(got, radix: 16)) is not NaN")
        #expect(got >> 15 == UInt16(bits >> 31), "sign")
    }

    @Test("bf16 → float32 is exact, and every non-NaN bf16 survives a round trip")
    func bf16RoundTrips() {
        #expect(ElementConversion.bf16ToFloat(0x3F80) == 1)
        #expect(ElementConversion.bf16ToFloat(0xC040) == -3)
        #expect(ElementConversion.bf16ToFloat(0x4256) == 53.5)
        #expect(ElementConversion.bf16ToFloat(0xFF80) == -.infinity)
        var failures: [UInt16] = []
        for bits in UInt16.min...UInt16.max {
            let value = ElementConversion.bf16ToFloat(bits)
            if value.isNaN { if !ElementConversion.floatToBF16(value).isBF16NaN { failures.append(bits) }; continue }
            if value.bitPattern != UInt32(bits) << 16 || ElementConversion.floatToBF16(value) != bits { failures.append(bits) }
        }
        #expect(failures.isEmpty, "\(failures.prefix(8).map { String($0, radix: 16) })")
    }

    @Test("float32 → bf16 is the nearest bf16, ties to even, by exact double arithmetic")
    func roundsToNearestByDoubleArithmetic() async {
        await propertyCheck(count: 2000, input: Gen.int(in: 0...Int(UInt32.max))) { raw in
            let x = Float(bitPattern: UInt32(raw))
            guard !x.isNaN else { return }
            let toward = UInt16(UInt32(raw) >> 16), away = toward &+ 1
            // bf16 values as doubles; one step past the largest finite value counts as 2^128.
            func value(_ b: UInt16) -> Double {
                b & 0x7FFF == 0x7F80 ? (b >> 15 == 1 ? -0x1p128 : 0x1p128) : Double(Float(bitPattern: UInt32(b) << 16))
            }
            if x.isInfinite { #expect(ElementConversion.floatToBF16(x) == toward); return }
            let below = abs(Double(x) - value(toward)), above = abs(value(away) - Double(x))
            let expected = below < above ? toward : above < below ? away : (toward & 1 == 0 ? toward : away)
            #expect(ElementConversion.floatToBF16(x) == expected, "x = \(x) (0x\(String(raw, radix: 16)))")
            #expect(ReferenceArithmetic.bf16Bits(x) == expected, "the test suite's own rounding")
        }
    }

    @Test("float32 → f16 rounds to nearest even and overflows to infinity")
    func f16Rounding() {
        #expect(ElementConversion.floatToF16(1) == 0x3C00)
        #expect(ElementConversion.floatToF16(1 + 0x1p-11) == 0x3C00)           // tie, even below
        #expect(ElementConversion.floatToF16(1 + 3 * 0x1p-11) == 0x3C02)       // tie, odd below
        #expect(ElementConversion.floatToF16(65504) == 0x7BFF)                 // largest f16
        #expect(ElementConversion.floatToF16(65519) == 0x7BFF)
        #expect(ElementConversion.floatToF16(65520) == 0x7C00)                 // tie past the largest: inf
        #expect(ElementConversion.floatToF16(-.infinity) == 0xFC00)
        #expect(Float16(bitPattern: ElementConversion.floatToF16(.nan)).isNaN)
        #expect(ElementConversion.f16ToFloat(0x3C00) == 1 && ElementConversion.f16ToFloat(0xC200) == -3)
    }
}

extension UInt16 {
    var isBF16NaN: Bool { self & 0x7F80 == 0x7F80 && self & 0x007F != 0 }
}
