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

    @Test("a view's element and byte counts saturate instead of overflowing")
    func viewCountsSaturate() {
        let huge = TensorRef(address: nil, dtype: .f32, shape: [Int.max, 2])
        #expect(huge.elementCount == .max && huge.byteCount == .max)
        let mixed = TensorRef(address: nil, dtype: .i64, shape: [Int.max, -2])
        #expect(mixed.elementCount == .min && mixed.byteCount == .min)
        #expect(TensorRef(address: nil, dtype: .bf16, shape: [1 << 40, 1 << 20]).byteCount == 1 << 61)
    }

    @Test("counts written into a view whose shape's product passes Int are refused by name")
    func writeCountsIntoAHugeView() throws {
        let info = LayoutInfo(expertCounters: [1, 2], expertOffsets: [0, 0], sourceRankCounters: [1, 2], expertSourceCounters: [1, 0, 0, 2],
                              receivedTotal: 3, droppedTokens: 0)
        let storage = try HostTensor(.i32, [4])
        let huge = TensorRef(address: storage.storage, dtype: .i32, shape: [Int.max, 2], owner: storage)
        #expect(throws: EPError.invalidArgument(field: "counts", value: "[\(Int.max), 2]", requirement: "must hold 2 int32 counts")) {
            try info.writeCounts(experts: huge, expertSources: nil)
        }
        try info.writeCounts(experts: TensorRef(address: storage.storage, dtype: .i32, shape: [2], owner: storage), expertSources: nil)
        #expect(try storage.array(of: Int32.self) == [1, 2, 0, 0])
    }
}
