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

    public var elementCount: Int { shape.reduce(1, *) }
    public var byteCount: Int { elementCount * dtype.byteSize }
    public var description: String { "\(dtype)\(shape)" }

    var isContiguous: Bool {
        guard let strides else { return true }
        var expected = 1
        for (size, stride) in zip(shape, strides).reversed() {
            if size > 1 && stride != expected { return false }
            expected *= size
        }
        return strides.count == shape.count
    }
}

/// An owning host buffer, for tests, the benchmark and callers who want one.
public final class HostTensor: @unchecked Sendable {
    public let dtype: DataType
    public let shape: [Int]
    public let storage: UnsafeMutableRawPointer
    public let byteCount: Int

    public init(_ dtype: DataType, _ shape: [Int]) {
        self.dtype = dtype
        self.shape = shape
        byteCount = shape.reduce(1, *) * dtype.byteSize
        storage = .allocate(byteCount: max(byteCount, 1), alignment: 64)
        storage.initializeMemory(as: UInt8.self, repeating: 0, count: max(byteCount, 1))
    }

    deinit { storage.deallocate() }

    public var ref: TensorRef { TensorRef(address: storage, dtype: dtype, shape: shape, owner: self) }
    public var elementCount: Int { shape.reduce(1, *) }

    public func fill(byte: UInt8) { storage.initializeMemory(as: UInt8.self, repeating: byte, count: byteCount) }
    public func bytes() -> [UInt8] { Array(UnsafeRawBufferPointer(start: storage, count: byteCount)) }

    public subscript<T>(as type: T.Type, index: Int) -> T {
        get { storage.load(fromByteOffset: index * MemoryLayout<T>.stride, as: T.self) }
        set { storage.storeBytes(of: newValue, toByteOffset: index * MemoryLayout<T>.stride, as: T.self) }
    }

    public func array<T>(of type: T.Type) -> [T] {
        (0..<byteCount / MemoryLayout<T>.stride).map { self[as: T.self, $0] }
    }

    public func copy<T>(from values: [T]) {
        precondition(values.count * MemoryLayout<T>.stride == byteCount, "HostTensor.copy: size mismatch")
        values.withUnsafeBytes { storage.copyMemory(from: $0.baseAddress!, byteCount: byteCount) }
    }
}
