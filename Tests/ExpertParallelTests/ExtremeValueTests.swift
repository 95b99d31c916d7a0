import ExpertParallel
import Testing

/// Public helpers given extreme values: named errors or saturated numbers, never traps.
@Suite("Extreme values")
struct ExtremeValueTests {
    @Test("unpacking a negative or too large count of exponent bytes is refused by name")
    func unpackCounts() throws {
        let words = FP8RowFormat.packExponentBytes([9, 8, 7])
        for count in [-1, Int.min, 5, Int.max] {
            #expect(throws: EPError.invalidArgument(field: "count", value: "\(count)", requirement: "must be in 0...4 (4 bytes in each of the 1 words)")) {
                try FP8RowFormat.unpackExponentBytes(words, count: count)
            }
        }
        #expect(try FP8RowFormat.unpackExponentBytes(words, count: 0).isEmpty)
        #expect(try FP8RowFormat.unpackExponentBytes(words, count: 4) == [9, 8, 7, 0])
    }
}
