import CExpertParallel
import ExpertParallel

/// A struct of the C ABI: it starts with `size_t structSize`, which the library checks before
/// reading anything else, so a caller built against another header version gets a clear error
/// instead of misread fields.
protocol ABIStruct {
    /// The sizes of this struct in earlier ABI versions that are still accepted (a struct only
    /// grows at its end): such a struct reads as if the newer fields were zero.
    static var earlierSizes: [Int] { get }
}

extension ABIStruct {
    static var earlierSizes: [Int] { [] }
}

extension epTensor_t: ABIStruct {}
extension epGroupConfig_t: ABIStruct { static var earlierSizes: [Int] { [MemoryLayout<Self>.offset(of: \.fp8Scales)!] } }
extension epBackendConfig_t: ABIStruct {
    static var earlierSizes: [Int] {
        [MemoryLayout<Self>.offset(of: \.tuning)!, sizeBefore(\.tuning.updateChunkTokens), sizeBefore(\.tuning.launchGrid)]
    }
}
extension epLayoutInfo_t: ABIStruct {}
extension epUpdateInputs_t: ABIStruct {}
extension epDispatchInputs_t: ABIStruct { static var earlierSizes: [Int] { [MemoryLayout<Self>.offset(of: \.scales)!] } }
extension epCombineInputs_t: ABIStruct {}
extension epCombineOutputs_t: ABIStruct {}
extension epNCCLRankConfig_t: ABIStruct {
    static var earlierSizes: [Int] {
        [MemoryLayout<Self>.offset(of: \.tuning)!, sizeBefore(\.tuning.updateChunkTokens), sizeBefore(\.tuning.launchGrid)]
    }
}
// Grown in ABI version 3: version 2's size ends where the first new field starts.
extension epGroupInfo_t: ABIStruct { static var earlierSizes: [Int] { [MemoryLayout<Self>.offset(of: \.bufferSlots)!] } }
extension epUpdateConfig_t: ABIStruct { static var earlierSizes: [Int] { [MemoryLayout<Self>.offset(of: \.step)!] } }
extension epDispatchOutputs_t: ABIStruct { static var earlierSizes: [Int] { [MemoryLayout<Self>.offset(of: \.expertCounts)!] } }
extension epDispatchConfig_t: ABIStruct { static var earlierSizes: [Int] { [MemoryLayout<Self>.offset(of: \.step)!] } }
extension epCombineConfig_t: ABIStruct { static var earlierSizes: [Int] { [MemoryLayout<Self>.offset(of: \.step)!] } }

extension ABIStruct {
    /// The size the struct had when `field` (grown into a nested struct at the end) did not exist
    /// yet: the offset of the field, rounded up to the struct's alignment.
    static func sizeBefore<Field>(_ field: KeyPath<Self, Field>) -> Int {
        let alignment = MemoryLayout<Self>.alignment
        return (MemoryLayout<Self>.offset(of: field)! + alignment - 1) / alignment * alignment
    }
}

extension ABIStruct where Self: BitwiseCopyable {
    /// `sizeof` of the struct in this ABI version.
    static var abiSize: Int { MemoryLayout<Self>.stride }

    static func checkSize(_ size: Int, _ name: @autoclosure () -> String) throws(EPError) {
        guard size == abiSize || earlierSizes.contains(size) else {
            let earlier = earlierSizes.isEmpty ? "" : " or an earlier version's \(earlierSizes.map(String.init).joined(separator: ", "))"
            throw .invalidArgument(
                field: "\(name()).structSize", value: "\(UInt(bitPattern: size))",
                requirement: "must be sizeof(\(Self.self)) = \(abiSize) (ABI version \(EP_ABI_VERSION))\(earlier)")
        }
    }

    /// The struct at `pointer` whose `structSize` is `size` (checked): the fields that size
    /// covers, the rest zero.
    private static func load(_ pointer: UnsafeRawPointer, size: Int) -> Self {
        if size == abiSize { return pointer.loadUnaligned(as: Self.self) }
        var value = withUnsafeTemporaryAllocation(byteCount: abiSize, alignment: MemoryLayout<Self>.alignment) { buffer in
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            buffer.baseAddress!.copyMemory(from: pointer, byteCount: size)
            return buffer.baseAddress!.load(as: Self.self)
        }
        withUnsafeMutableBytes(of: &value) { $0.storeBytes(of: abiSize, as: Int.self) }
        return value
    }

    /// The struct at `pointer`, after checking that it is there and has an accepted size.
    static func read(_ pointer: UnsafeRawPointer?, _ name: @autoclosure () -> String) throws(EPError) -> Self {
        guard let pointer else {
            throw .invalidArgument(field: name(), value: "NULL", requirement: "must point to an \(Self.self)")
        }
        let size = pointer.loadUnaligned(as: Int.self)
        try checkSize(size, name())
        return load(pointer, size: size)
    }

    /// The struct at `pointer`, or nil when it is NULL (an optional struct such as a config).
    static func readOptional(_ pointer: UnsafeRawPointer?, _ name: @autoclosure () -> String) throws(EPError) -> Self? {
        guard let pointer else { return nil }
        return try read(pointer, name())
    }

    /// `count` structs from an array whose stride is its first element's `structSize`; every
    /// element must carry the same size.
    static func readArray(_ pointer: UnsafeRawPointer?, count: Int, _ name: @autoclosure () -> String) throws(EPError) -> [Self] {
        guard let pointer else {
            throw .invalidArgument(field: name(), value: "NULL", requirement: "must point to an array of \(count) \(Self.self)")
        }
        let stride = pointer.loadUnaligned(as: Int.self)
        try checkSize(stride, "\(name())[0]")
        var elements: [Self] = []
        elements.reserveCapacity(count)
        for i in 0..<count {
            let element = pointer + i * stride
            let size = element.loadUnaligned(as: Int.self)
            guard size == stride else {
                throw .invalidArgument(field: "\(name())[\(i)].structSize", value: "\(UInt(bitPattern: size))", requirement: "must equal \(name())[0].structSize (\(stride))")
            }
            elements.append(load(element, size: size))
        }
        return elements
    }
}

/// A pointer argument that must not be NULL.
func required<T>(_ pointer: T?, _ name: @autoclosure () -> String) throws(EPError) -> T {
    guard let pointer else { throw .invalidArgument(field: name(), value: "NULL", requirement: "must not be NULL") }
    return pointer
}

/// Writes a struct the caller owns, without assuming the caller aligned it: the first `size`
/// bytes (the caller's `structSize`, already checked; an earlier version's struct gets its own
/// fields only), with the caller's `structSize` kept.
func write<T: ABIStruct & BitwiseCopyable>(_ value: T, to pointer: UnsafeMutableRawPointer) {
    let size = min(pointer.loadUnaligned(as: Int.self), T.abiSize)
    withUnsafeBytes(of: value) { bytes in
        pointer.advanced(by: MemoryLayout<Int>.size).copyMemory(
            from: bytes.baseAddress!.advanced(by: MemoryLayout<Int>.size), byteCount: max(0, size - MemoryLayout<Int>.size))
    }
}

/// A fixed-size C array (imported as a tuple) of `Int64`, as the first `count` values.
func int64Values<Tuple>(_ tuple: Tuple, count: Int) -> [Int] {
    withUnsafeBytes(of: tuple) { raw in
        (0..<min(count, raw.count / 8)).map { Int(raw.loadUnaligned(fromByteOffset: $0 * 8, as: Int64.self)) }
    }
}

/// Stores `values` (at most `EP_MAX_DIMS` of them) into a fixed-size C array of `Int64`.
func setInt64Values<Tuple>(_ tuple: inout Tuple, _ values: [Int]) {
    withUnsafeMutableBytes(of: &tuple) { raw in
        for (i, v) in values.prefix(raw.count / 8).enumerated() { raw.storeBytes(of: Int64(v), toByteOffset: i * 8, as: Int64.self) }
    }
}
