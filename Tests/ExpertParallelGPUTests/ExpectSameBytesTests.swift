import Testing

/// The oracle tests' byte comparison (GPUOracle.swift) reports a mismatch of large buffers at once,
/// with the first difference, instead of `#expect`'s collection diff (quadratic in the length).
struct ExpectSameBytesTests {
    @Test func aMismatchOfLargeBuffersNamesTheFirstDifference() {
        let a = [UInt8](repeating: 0, count: 1 << 20)
        var b = a
        var changed = 0
        for i in stride(from: 5, to: b.count, by: 3) { b[i] = 1; changed += 1 }
        let differing = changed
        withKnownIssue {
            expectSameBytes(a, b, "rows")
        } matching: { issue in
            issue.comments.contains { $0.rawValue.contains("rows differ: 1048576 bytes against 1048576 expected, first difference at byte 5, \(differing) bytes differ") }
        }
        withKnownIssue {
            expectSameBytes(a, nil, "scales")
        } matching: { issue in
            issue.comments.contains { $0.rawValue.contains("scales: some where the oracle has none") }
        }
    }

    @Test func equalBuffersRecordNothing() {
        let a = [UInt8](repeating: 7, count: 1 << 20)
        expectSameBytes(a, a, "rows")
        expectSameBytes(a[10..<20], a[30..<40], "a slice")
        expectSameBytes([UInt8]?.none, nil, "absent")
    }
}
