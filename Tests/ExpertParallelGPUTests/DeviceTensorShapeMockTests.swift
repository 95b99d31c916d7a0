import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Testing

/// `DeviceTensor(_:_:on:)` multiplied its shape out unchecked: a shape whose bytes pass Int.max
/// trapped, and a negative size made a tensor of negative bytes. Both are named errors now.
struct DeviceTensorShapeMockTests {
    @Test func aShapeBeyondIntOrNegativeIsRefusedByName() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            #expect(throws: EPError.invalidArgument(field: "shape", value: "[4611686018427387904, 4]",
                                                    requirement: "must describe at most 9223372036854775807 bytes of f32")) {
                _ = try DeviceTensor(.f32, [1 << 62, 4], on: device)
            }
            #expect(throws: EPError.invalidArgument(field: "shape[1]", value: "-3", requirement: "must be ≥ 0")) {
                _ = try DeviceTensor(.bf16, [2, -3], on: device)
            }
            // A negative size is named even after sizes whose product overflows.
            #expect(throws: EPError.invalidArgument(field: "shape[2]", value: "-1", requirement: "must be ≥ 0")) {
                _ = try DeviceTensor(.f32, [1 << 62, 4, -1], on: device)
            }
            #expect(mock.deviceMemory.isEmpty)
            let empty = try DeviceTensor(.f32, [0, 8], on: device)
            #expect(empty.byteCount == 0)
            // A size of 0 is an empty tensor whatever the sizes before it (the product is 0, as
            // before the overflow check, which refused [2^62, 0]: 4 × 2^62 overflowed first).
            for shape in [[1 << 62, 0], [Int.max, 3, 0], [0, Int.max]] {
                #expect(try DeviceTensor(.f32, shape, on: device).byteCount == 0, "\(shape)")
            }
        }
    }

    /// `upload(_:)` and `download(into:)` of a `HostTensor` of another byte count trapped; they
    /// name it now and copy nothing either way.
    @Test func aHostTensorOfAnotherByteCountIsRefusedByNameAndNothingIsCopied() throws {
        try MockCUDA.run { _ in
            let device = try MockCUDA.device()
            let tensor = try DeviceTensor(.f32, [2, 4], on: device)
            let values = try HostTensor(.f32, [2, 4])
            try values.copy(from: (0..<8).map(Float.init))
            try tensor.upload(values)
            let deviceBytes = { UnsafeRawBufferPointer(start: MockCUDA.at(tensor.pointer.rawValue), count: tensor.byteCount).map { $0 } }
            let before = deviceBytes()
            #expect(before == values.bytes())
            for shape in [[2, 3], [2, 5], [0]] {
                let other = try HostTensor(.f32, shape)
                other.fill(byte: 0x5A)
                let requirement = "must equal the byte count (32) of this f32[2, 4] DeviceTensor"
                #expect(throws: EPError.invalidArgument(field: "host.byteCount", value: "\(other.byteCount)", requirement: requirement)) {
                    try tensor.upload(other)
                }
                #expect(deviceBytes() == before, "\(shape): nothing uploaded")
                #expect(throws: EPError.invalidArgument(field: "host.byteCount", value: "\(other.byteCount)", requirement: requirement)) {
                    try tensor.download(into: other)
                }
                #expect(other.bytes().allSatisfy { $0 == 0x5A }, "\(shape): nothing downloaded")
            }
            // Same bytes, another element type: a byte copy, as before.
            let bits = try HostTensor(.i32, [8])
            try tensor.download(into: bits)
            #expect(bits.bytes() == before)
        }
    }
}
