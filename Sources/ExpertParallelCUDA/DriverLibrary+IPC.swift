import CExpertParallelShim

/// `CUipcMemHandle`: 64 opaque bytes naming a device allocation for another process.
public struct IPCMemHandle: Sendable, Hashable {
    public static let byteCount = 64
    public var bytes: [UInt8]

    public init(bytes: [UInt8]) throws {
        guard bytes.count == Self.byteCount else {
            throw CUDAError.driver(call: "IPCMemHandle(bytes:)", code: 1, name: "CUDA_ERROR_INVALID_VALUE (\(bytes.count) bytes, need \(Self.byteCount))")
        }
        self.bytes = bytes
    }
}

/// The driver's IPC entry points, looked up when first used (the shim calls the one that takes
/// the handle by value).
struct DriverIPCFunctions {
    let cuIpcGetMemHandle: @convention(c) (UnsafeMutableRawPointer?, UInt64) -> Int32
    let cuIpcOpenMemHandle: UnsafeRawPointer
    let cuIpcCloseMemHandle: @convention(c) (UInt64) -> Int32

    init(_ library: DynamicLibrary) throws {
        cuIpcGetMemHandle = try library.function("cuIpcGetMemHandle")
        cuIpcOpenMemHandle = try library.function("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")
        cuIpcCloseMemHandle = try library.function("cuIpcCloseMemHandle")
    }
}

extension DriverLibrary {
    /// `cuIpcGetMemHandle` of an allocation made with `allocate(byteCount:)` (cuMemAlloc).
    public func ipcHandle(for pointer: DevicePointer) throws -> IPCMemHandle {
        var bytes = [UInt8](repeating: 0, count: IPCMemHandle.byteCount)
        try check(try ipc().cuIpcGetMemHandle(&bytes, pointer.rawValue), "cuIpcGetMemHandle")
        return try IPCMemHandle(bytes: bytes)
    }

    /// `cuIpcOpenMemHandle` with `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`: another process's
    /// allocation, mapped into this context.
    public func openIPCHandle(_ handle: IPCMemHandle) throws -> DevicePointer {
        var value = ep_cu_ipc_mem_handle()
        withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: handle.bytes) }
        var pointer: UInt64 = 0
        let lazyEnablePeerAccess: UInt32 = 1
        try check(ep_shim_cu_ipc_open_mem_handle(try ipc().cuIpcOpenMemHandle, &pointer, &value, lazyEnablePeerAccess), "cuIpcOpenMemHandle")
        return DevicePointer(rawValue: pointer)
    }

    public func closeIPCHandle(_ pointer: DevicePointer) throws {
        try check(try ipc().cuIpcCloseMemHandle(pointer.rawValue), "cuIpcCloseMemHandle")
    }
}
