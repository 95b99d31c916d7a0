import CExpertParallel
import ExpertParallel
import Foundation

/// The tensor descriptors a group's collective calls were last given, by argument and rank, with
/// what each was converted to. A caller that passes the same descriptors again (the Python
/// package keeps them from call to call) skips their conversion and checks: a call then
/// allocates no shape arrays for them. Compared byte for byte with what was converted, so a
/// descriptor changed in place, or another one at the same place, is converted and checked again.
/// Used under the group's lock (the collective calls are serialised).
final class DescriptorCache {
    /// Descriptors per rank a collective call may pass: update 1, dispatch 3 + 6, combine 3 + 2.
    static let perRank = 15
    enum Field: Int {
        case updateTopkIdx
        case dispatchTokens, dispatchWeights, dispatchScales
        case receivedTokens, receivedTopkIdx, receivedWeights, expertCounts, expertSourceCounts, receivedScales
        case expertOutputs, combineWeights, weightGradients
        case combinedTokens, weightGradientsOut
    }

    // By slot (rank × perRank + field): where the descriptor was, its bytes, what it became.
    // Kept apart so that a lookup compares in place and copies nothing but the tensor.
    private var pointers: [UnsafeRawPointer?]
    private var bytes: [epTensor_t]
    private var tensors: [TensorRef?]

    init(ranks: Int) {
        pointers = Array(repeating: nil, count: ranks * Self.perRank)
        bytes = Array(repeating: epTensor_t(), count: ranks * Self.perRank)
        tensors = Array(repeating: nil, count: ranks * Self.perRank)
    }

    /// The tensor `pointer` describes (as `TensorDescriptor.tensor`), for `field` of rank `rank`.
    func tensor(_ pointer: UnsafePointer<epTensor_t>?, _ rank: Int, _ field: Field, _ name: @autoclosure () -> String) throws(EPError) -> TensorRef {
        guard let pointer else { return try TensorDescriptor.tensor(nil, name()) }
        let raw = UnsafeRawPointer(pointer), size = epTensor_t.abiSize
        let slot = rank * Self.perRank + field.rawValue
        guard slot < pointers.count else { return try TensorDescriptor.tensor(pointer, name()) }
        if pointers[slot] == raw, bytes.withUnsafeBufferPointer({ memcmp($0.baseAddress! + slot, raw, size) }) == 0, let tensor = tensors[slot] {
            return tensor
        }
        let tensor = try TensorDescriptor.tensor(pointer, name())
        if raw.loadUnaligned(as: Int.self) == size {
            pointers[slot] = raw
            // Byte for byte, padding included, as the lookup compares them.
            bytes.withUnsafeMutableBufferPointer { UnsafeMutableRawPointer($0.baseAddress! + slot).copyMemory(from: raw, byteCount: size) }
            tensors[slot] = tensor
        }
        return tensor
    }

    /// `cache.tensor`, or `TensorDescriptor.tensor` where there is no cache.
    static func tensor(
        _ pointer: UnsafePointer<epTensor_t>?, in cache: DescriptorCache?, _ rank: Int, _ field: Field, _ name: @autoclosure () -> String
    ) throws(EPError) -> TensorRef {
        guard let cache else { return try TensorDescriptor.tensor(pointer, name()) }
        return try cache.tensor(pointer, rank, field, name())
    }

    /// `tensor(_:in:...)`, or nil when the pointer is NULL (an optional tensor).
    static func optionalTensor(
        _ pointer: UnsafePointer<epTensor_t>?, in cache: DescriptorCache?, _ rank: Int, _ field: Field, _ name: @autoclosure () -> String
    ) throws(EPError) -> TensorRef? {
        guard let pointer else { return nil }
        return try tensor(pointer, in: cache, rank, field, name())
    }
}
