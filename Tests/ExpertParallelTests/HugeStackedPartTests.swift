@testable import ExpertParallel
import Testing

/// A group whose receive buffer is larger than any real memory (the library bounds experts,
/// hidden and maxTokensPerRank, not their product) took a stacked call down with an integer
/// overflow: the product of its receive shape, a part's bytes, or the bytes of every rank's part.
/// Each is a named error now, as the per-rank calls' descriptors refuse such a tensor.
@Suite struct HugeStackedPartTests {
    /// LL expert-major, 4 × (2^31 − 1) × (2^31 − 4) bf16 received elements: more than Int.max.
    static let overflowingShape = GroupConfig(
        algorithm: .lowLatency, ranks: 1, experts: 4, topK: 1, hidden: (1 << 31) - 4, maxTokensPerRank: (1 << 31) - 1)
    /// 64 ranks of [1, 64 × 2^26, 2^26] bf16 (2^59 bytes a part): the parts together pass 2^64.
    static let overflowingParts = GroupConfig(
        algorithm: .lowLatency, ranks: 64, experts: 64, topK: 1, hidden: 1 << 26, maxTokensPerRank: 1 << 26)

    static func dispatch(received: UInt64) -> StackedDispatch {
        StackedDispatch(tokens: 0, topkIdx: nil, inputs: StackedTensor(address: 0, dtype: .bf16, location: .host),
                        received: StackedTensor(address: received, dtype: .bf16, location: .host))
    }

    static func refusal(_ config: GroupConfig, _ call: StackedDispatch) -> EPError? {
        do throws(EPError) {
            _ = try CheckedStackedDispatch(call, shapes: CallShapes(try config.validated()), location: .host, stepTokens: nil)
            return nil
        } catch {
            return error
        }
    }

    @Test(arguments: [UInt64(0), 1 << 20])
    func aReceiveShapeWhoseProductOverflowsIsRefusedByName(_ address: UInt64) {
        let error = Self.refusal(Self.overflowingShape, Self.dispatch(received: address))
        guard case let .invalidArgument(field, value, requirement)? = error else {
            Issue.record("not refused by name: \(String(describing: error))")
            return
        }
        #expect(field.hasPrefix("received"), "\(field): \(value) \(requirement)")
        #expect(value.contains("2147483647") || requirement.contains("2147483647") || requirement.contains("2^62"), "\(value) \(requirement)")
    }

    @Test func packedPartsThatPassTheAddressSpaceAreRefusedByName() {
        let error = Self.refusal(Self.overflowingParts, Self.dispatch(received: 1 << 20))
        #expect(error == .invalidArgument(
            field: "received", value: "bf16[1, 4294967296, 67108864] (576460752303423488 bytes a part)",
            requirement: "must be at most 72057594037927936 bytes a part (2^62 / 64 ranks): every rank's address stays far inside 64 bits"))
    }

    @Test func aCombineOfAnOverflowingShapeIsRefusedByName() {
        let call = StackedCombine(expertOutputs: StackedTensor(address: 1 << 20, dtype: .bf16, location: .host),
                                  topkWeights: StackedTensor(address: 1 << 30, dtype: .f32, location: .host),
                                  combined: StackedTensor(address: 1 << 40, dtype: .bf16, location: .host))
        // Refused for the part's size (not for some other argument): expertOutputs, its shape and the bound.
        #expect(throws: EPError.invalidArgument(
            field: "expertOutputs", value: "bf16[4, 2147483647, 2147483644] (more than 2^62 bytes a part)",
            requirement: "must be at most 4611686018427387904 bytes a part (2^62 / 1 ranks): every rank's address stays far inside 64 bits")) {
            _ = try CheckedStackedCombine(call, tokens: [1], direction: .forward, shapes: CallShapes(try Self.overflowingShape.validated()),
                                          location: .host)
        }
    }

    /// Rank 0's view is the description's own address, whatever the size of a part.
    @Test func rankZerosPartOfAnOverflowingShapeIsItsAddress() {
        let part = StackedTensor(address: 4096, dtype: .bf16, location: .host).part(0, shape: Self.overflowingShape.receiveShape)
        #expect(part.address == UnsafeMutableRawPointer(bitPattern: 4096))
    }

    /// The per-rank checks of such a shape (the Swift API's views): strides checked, and a nil
    /// address refused by name, without multiplying past Int.max.
    @Test func aViewOfAnOverflowingShapeIsCheckedWithoutTrapping() throws {
        let shape = Self.overflowingShape.receiveShape
        let strided = TensorRef(address: UnsafeMutableRawPointer(bitPattern: 1 << 20), dtype: .bf16, shape: shape,
                                strides: [shape[1] * shape[2], shape[2], 1])
        #expect(strided.isContiguous)
        var gapped = strided
        gapped.strides = [shape[1] * shape[2], shape[2] + 1, 1]
        #expect(!gapped.isContiguous)
        try TensorCheck.require(strided, "output.tokens", dtypes: [.bf16], shape: shape)
        let missing = TensorRef(address: nil, dtype: .bf16, shape: shape)
        #expect(throws: EPError.invalidArgument(field: "output.tokens.address", value: "nil",
                                                requirement: "must be non-nil for 4 × 2147483647 × 2147483644 elements")) {
            try TensorCheck.require(missing, "output.tokens", dtypes: [.bf16], shape: shape)
        }
    }
}
