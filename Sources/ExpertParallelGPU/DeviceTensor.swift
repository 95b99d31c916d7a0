import ExpertParallel
import ExpertParallelCUDA

/// An owning device buffer with a shape, for tests, the benchmark and callers who want one.
public final class DeviceTensor: @unchecked Sendable {
    public let device: GPUDevice
    public let dtype: DataType
    public let shape: [Int]
    public let pointer: DevicePointer
    public let byteCount: Int

    public init(_ dtype: DataType, _ shape: [Int], on device: GPUDevice) throws(EPError) {
        self.device = device
        self.dtype = dtype
        self.shape = shape
        // The caller's shape: every size ≥ 0 and the bytes inside Int (else a named error, not a trap).
        // A size of 0 makes an empty tensor whatever the other sizes (as the unchecked product did).
        if let i = shape.firstIndex(where: { $0 < 0 }) {
            throw .invalidArgument(field: "shape[\(i)]", value: "\(shape[i])", requirement: "must be ≥ 0")
        }
        guard let bytes = TensorRef.checkedProduct(shape, times: dtype.byteSize) else {
            throw .invalidArgument(field: "shape", value: "\(shape)", requirement: "must describe at most \(Int.max) bytes of \(dtype)")
        }
        byteCount = bytes
        try device.makeCurrent()
        pointer = try device.allocateZeroed(byteCount: max(bytes, 16))
    }

    deinit { try? device.driver.free(pointer) }

    public var ref: TensorRef {
        TensorRef(address: UnsafeMutableRawPointer(bitPattern: UInt(pointer.rawValue)), dtype: dtype, shape: shape,
                  location: .device(device.ordinal), owner: self)
    }

    /// Copies `bytes` (exactly `byteCount` of them) to the device, and returns once they are there.
    /// (A plain copy from pageable memory may return before its DMA lands, and the groups'
    /// streams do not wait for CUDA's legacy stream, so the wait is explicit.)
    public func upload(_ bytes: UnsafeRawPointer) throws(EPError) {
        guard byteCount > 0 else { return }
        try gpu { try device.driver.copy(from: bytes, to: pointer, byteCount: byteCount) }
        try device.waitForLegacyStream()
    }

    /// Copies `host`'s bytes to the device (as `upload(_:)` of a pointer); `invalidArgument`
    /// naming `host.byteCount`, and nothing copied, unless it is this tensor's `byteCount`.
    public func upload(_ host: HostTensor) throws(EPError) {
        try requireSameBytes(host)
        try upload(UnsafeRawPointer(host.storage))
    }

    /// Copies the tensor back into `host`, synchronously; `invalidArgument` naming
    /// `host.byteCount`, and nothing copied, unless it is this tensor's `byteCount`.
    public func download(into host: HostTensor) throws(EPError) {
        try requireSameBytes(host)
        guard byteCount > 0 else { return }
        try gpu { try device.driver.copy(from: pointer, to: host.storage, byteCount: byteCount) }
    }

    private func requireSameBytes(_ host: HostTensor) throws(EPError) {
        guard host.byteCount == byteCount else {
            throw .invalidArgument(field: "host.byteCount", value: "\(host.byteCount)",
                                   requirement: "must equal the byte count (\(byteCount)) of this \(dtype)\(shape) DeviceTensor")
        }
    }

    /// Sets every byte to `byte`, and returns once that is done (a memset runs on CUDA's legacy
    /// stream, which the groups' streams do not wait for).
    public func fill(byte: UInt8) throws(EPError) {
        try gpu { try device.driver.fill(pointer, byte: byte, byteCount: max(byteCount, 16)) }
        try device.waitForLegacyStream()
    }
}
