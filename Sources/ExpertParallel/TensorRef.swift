import Foundation

/// Where a tensor's memory lives.
public enum MemoryLocation: Sendable, Hashable {
    case host
    case device(Int)
}

/// A borrowed view of a caller-owned tensor: base address, element type, shape, strides.
/// The library never frees or resizes it; it writes only into tensors passed as outputs.
public struct TensorRef: @unchecked Sendable, CustomStringConvertible {
    public var address: UnsafeMutableRawPointer?
    public var dtype: DataType
    public var shape: [Int]
    /// Strides in elements; `nil` means contiguous row-major.
    public var strides: [Int]?
    public var location: MemoryLocation
    /// The object that owns the memory (a `HostTensor`, a `DeviceTensor`), kept alive while the
    /// view is: an optimised build may free an owner right after its last use, which would
    /// otherwise come before a call that reads or writes its memory through this view.
    public var owner: AnyObject?

    public init(
        address: UnsafeMutableRawPointer?, dtype: DataType, shape: [Int], strides: [Int]? = nil,
        location: MemoryLocation = .host, owner: AnyObject? = nil
    ) {
        self.address = address
        self.dtype = dtype
        self.shape = shape
        self.strides = strides
        self.location = location
        self.owner = owner
    }

    /// The product of the sizes; Int.max (Int.min) where it would leave Int (a caller's shape may
    /// be anything: checks compare it first).
    public var elementCount: Int { shape.reduce(1, Saturating.product) }

    /// `start` × every size of `shape`, exactly: 0 where a size is 0, nil where a size is
    /// negative or the product passes Int.max (shapes of the caller's, or of a group whose
    /// bounds hold each size, not their product).
    package static func checkedProduct(_ shape: [Int], times start: Int = 1) -> Int? {
        if shape.contains(where: { $0 < 0 }) { return nil }
        if shape.contains(0) { return 0 }
        var product = start
        for size in shape {
            let (next, overflow) = product.multipliedReportingOverflow(by: size)
            if overflow { return nil }
            product = next
        }
        return product
    }

    /// `elementCount` × the element's bytes, saturating as `elementCount` does.
    public var byteCount: Int { Saturating.product(elementCount, dtype.byteSize) }
    public var description: String { "\(dtype)\(shape)" }

    var isContiguous: Bool {
        guard let strides else { return true }
        // `expected` past Int.max (a shape larger than memory): no stride equals it.
        var expected = 1, overflow = false
        for (size, stride) in zip(shape, strides).reversed() {
            if size > 1 && (overflow || stride != expected) { return false }
            (expected, overflow) = overflow ? (expected, true) : expected.multipliedReportingOverflow(by: size)
        }
        return strides.count == shape.count
    }
}

/// An owning host buffer, for tests, the benchmark and callers who want one. Its element
/// accessors take a Swift type of the element's size (`Int32` or `UInt32` for `i32`, `Float` for
/// `f32`, `UInt16` for the bits of `bf16`/`f16`, `UInt8` for `u8`/`e4m3`; `copy(from:)` also takes
/// the raw bytes), never a reinterpretation (an `[Int]` literal into an `i32` tensor would
/// otherwise fill it with the halves of 64-bit values): `copy(from:)` and `array(of:)` throw
/// `invalidArgument` naming another size or a wrong count, and write nothing; the element
/// subscript, which cannot throw, traps like an array's. `bytes()` reads the raw bytes of any tensor.
public final class HostTensor: @unchecked Sendable {
    public let dtype: DataType
    public let shape: [Int]
    public let storage: UnsafeMutableRawPointer
    public let byteCount: Int
    /// The product of the sizes (0 where one is 0, whatever the others are).
    public let elementCount: Int

    /// A zero-filled tensor. The shape is the caller's, checked before anything is allocated (as
    /// `DeviceTensor`'s): a negative size, or bytes past Int.max, throws `invalidArgument` naming
    /// it; bytes past this host's memory (or that the allocator refuses) throw `outOfMemory`. A
    /// size of 0 makes an empty tensor whatever the other sizes.
    public init(_ dtype: DataType, _ shape: [Int]) throws(EPError) {
        if let i = shape.firstIndex(where: { $0 < 0 }) {
            throw .invalidArgument(field: "shape[\(i)]", value: "\(shape[i])", requirement: "must be ≥ 0")
        }
        guard let bytes = TensorRef.checkedProduct(shape, times: dtype.byteSize) else {
            throw .invalidArgument(field: "shape", value: "\(shape)", requirement: "must describe at most \(Int.max) bytes of \(dtype)")
        }
        let what = "a HostTensor of \(dtype)\(shape)"
        let available = Int(clamping: ProcessInfo.processInfo.physicalMemory)
        guard bytes <= available else { throw .outOfMemory(buffer: what, bytes: bytes, available: available) }
        // posix_memalign, not `allocate`: a refusal is a nil here, where `allocate` would trap.
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 64, max(bytes, 1)) == 0, let memory else {
            throw .outOfMemory(buffer: what + " (the allocator refused it)", bytes: bytes, available: available)
        }
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: max(bytes, 1))
        self.dtype = dtype
        self.shape = shape
        byteCount = bytes
        elementCount = bytes / dtype.byteSize
        storage = memory
    }

    deinit { free(storage) }

    public var ref: TensorRef { TensorRef(address: storage, dtype: dtype, shape: shape, owner: self) }

    public func fill(byte: UInt8) { storage.initializeMemory(as: UInt8.self, repeating: byte, count: byteCount) }
    public func bytes() -> [UInt8] { Array(UnsafeRawBufferPointer(start: storage, count: byteCount)) }

    /// `invalidArgument` naming `type` (`array(of:)`) or `values` (`copy(from:)`, which also takes
    /// raw bytes) unless `T` is the element's size.
    private func requireElement<T>(_ type: T.Type, forCopy: Bool) throws(EPError) {
        let bytes = MemoryLayout<T>.stride
        guard bytes != dtype.byteSize else { return }
        let size = "\(dtype.byteSize) bytes, the size of this tensor's \(dtype) elements"
        throw forCopy
            ? .invalidArgument(field: "values", value: "[\(T.self)] (\(bytes)-byte elements)",
                               requirement: "must have elements of \(size), or be [UInt8] (its raw bytes)")
            : .invalidArgument(field: "type", value: "\(T.self) (\(bytes) bytes)", requirement: "must be \(size)")
    }

    /// The byte offset of element `index` as a `T`, after checking both (traps, naming them).
    private func offset<T>(_ type: T.Type, _ index: Int) -> Int {
        precondition(MemoryLayout<T>.stride == dtype.byteSize,
                     "HostTensor.subscript: \(T.self) is \(MemoryLayout<T>.stride) bytes; this tensor's \(dtype) elements are \(dtype.byteSize)")
        precondition(index >= 0 && index < elementCount, "HostTensor.subscript: index \(index) is not in 0..<\(elementCount)")
        return index * MemoryLayout<T>.stride
    }

    /// Element `index` as `T`. Like `Array`'s subscript it traps (a precondition failure that names
    /// both) on an index outside `0..<elementCount`, or on a `T` that is not the element's size: a
    /// subscript with a setter cannot throw. For indices or types from your own data, check them
    /// first, or use `array(of:)` and `copy(from:)`, which throw.
    public subscript<T>(as type: T.Type, index: Int) -> T {
        get { storage.load(fromByteOffset: offset(T.self, index), as: T.self) }
        set { storage.storeBytes(of: newValue, toByteOffset: offset(T.self, index), as: T.self) }
    }

    /// Every element as `T`; `invalidArgument` naming `type` unless `T` is the element's size.
    public func array<T>(of type: T.Type) throws(EPError) -> [T] {
        try requireElement(T.self, forCopy: false)
        return (0..<elementCount).map { storage.load(fromByteOffset: $0 * MemoryLayout<T>.stride, as: T.self) }
    }

    /// Sets every element from `values`: `elementCount` of them, of the element's size, or the
    /// tensor's raw bytes (`[UInt8]`, `byteCount` of them: `RandomRouting.payload`'s encoding).
    /// Anything else throws `invalidArgument` naming `values` (another element size) or
    /// `values.count` (a count other than the tensor's), and writes nothing.
    public func copy<T>(from values: [T]) throws(EPError) {
        if T.self == UInt8.self && dtype.byteSize != 1 {
            guard values.count == byteCount else {
                throw .invalidArgument(field: "values.count", value: "\(values.count)",
                                       requirement: "must equal the byte count (\(byteCount)) of this \(dtype)\(shape) tensor, for its raw bytes")
            }
        } else {
            try requireElement(T.self, forCopy: true)
            guard values.count == elementCount else {
                throw .invalidArgument(field: "values.count", value: "\(values.count)",
                                       requirement: "must equal the element count (\(elementCount)) of this \(dtype)\(shape) tensor")
            }
        }
        guard byteCount > 0 else { return }
        values.withUnsafeBytes { storage.copyMemory(from: $0.baseAddress!, byteCount: byteCount) }
    }
}
