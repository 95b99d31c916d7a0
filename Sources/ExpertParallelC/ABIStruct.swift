import CExpertParallel
import ExpertParallel

/// A struct of the C ABI: it starts with `size_t structSize`, which the library checks before
/// reading anything else, so a caller built against another header version gets a clear error
/// instead of misread fields.
protocol ABIStruct {}

extension epTensor_t: ABIStruct {}
extension epGroupConfig_t: ABIStruct {}
extension epBackendConfig_t: ABIStruct {}
extension epGroupInfo_t: ABIStruct {}
extension epLayoutInfo_t: ABIStruct {}
extension epUpdateInputs_t: ABIStruct {}
extension epUpdateConfig_t: ABIStruct {}
extension epDispatchInputs_t: ABIStruct {}
extension epDispatchOutputs_t: ABIStruct {}
extension epDispatchConfig_t: ABIStruct {}
extension epCombineInputs_t: ABIStruct {}
extension epCombineOutputs_t: ABIStruct {}
extension epCombineConfig_t: ABIStruct {}
extension epNCCLRankConfig_t: ABIStruct {}

extension ABIStruct where Self: BitwiseCopyable {
    /// `sizeof` of the struct in this ABI version, the only `structSize` accepted (no struct has
    /// grown since version 1).
    static var abiSize: Int { MemoryLayout<Self>.stride }

    static func checkSize(_ size: Int, _ name: String) throws(EPError) {
        guard size == abiSize else {
            throw .invalidArgument(
                field: "\(name).structSize", value: "\(size)",
                requirement: "must be sizeof(\(Self.self)) = \(abiSize) (ABI version \(EP_ABI_VERSION))")
        }
    }

    /// The struct at `pointer`, after checking that it is there and has this ABI's size.
    static func read(_ pointer: UnsafeRawPointer?, _ name: String) throws(EPError) -> Self {
        guard let pointer else {
            throw .invalidArgument(field: name, value: "NULL", requirement: "must point to an \(Self.self)")
        }
        try checkSize(pointer.loadUnaligned(as: Int.self), name)
        return pointer.loadUnaligned(as: Self.self)
    }

    /// The struct at `pointer`, or nil when it is NULL (an optional struct such as a config).
    static func readOptional(_ pointer: UnsafeRawPointer?, _ name: String) throws(EPError) -> Self? {
        guard let pointer else { return nil }
        return try read(pointer, name)
    }

    /// `count` structs from an array whose stride is its first element's `structSize`; every
    /// element must carry the same size.
    static func readArray(_ pointer: UnsafeRawPointer?, count: Int, _ name: String) throws(EPError) -> [Self] {
        guard let pointer else {
            throw .invalidArgument(field: name, value: "NULL", requirement: "must point to an array of \(count) \(Self.self)")
        }
        let stride = pointer.loadUnaligned(as: Int.self)
        try checkSize(stride, "\(name)[0]")
        var elements: [Self] = []
        elements.reserveCapacity(count)
        for i in 0..<count {
            let element = pointer + i * stride
            try checkSize(element.loadUnaligned(as: Int.self), "\(name)[\(i)]")
            elements.append(element.loadUnaligned(as: Self.self))
        }
        return elements
    }
}

/// A pointer argument that must not be NULL.
func required<T>(_ pointer: T?, _ name: String) throws(EPError) -> T {
    guard let pointer else { throw .invalidArgument(field: name, value: "NULL", requirement: "must not be NULL") }
    return pointer
}

/// Writes a struct the caller owns, without assuming the caller aligned it.
func write<T: ABIStruct & BitwiseCopyable>(_ value: T, to pointer: UnsafeMutableRawPointer) {
    pointer.storeBytes(of: value, as: T.self)
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
