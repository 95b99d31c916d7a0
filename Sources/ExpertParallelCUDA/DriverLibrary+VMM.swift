/// The driver's virtual-memory entry points that share an allocation made with `cuMemCreate`
/// (what `ncclMemAlloc` returns) with another process: export it as a POSIX file descriptor,
/// import a peer's descriptor, and map it into this context. Looked up when first used.
struct DriverVMMFunctions {
    typealias Result = Int32
    let cuMemGetAddressRange: @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<Int>?, UInt64) -> Result
    let cuMemRetainAllocationHandle: @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutableRawPointer?) -> Result
    let cuMemExportToShareableHandle: @convention(c) (UnsafeMutableRawPointer?, UInt64, Int32, UInt64) -> Result
    let cuMemImportFromShareableHandle: @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutableRawPointer?, Int32) -> Result
    let cuMemAddressReserve: @convention(c) (UnsafeMutablePointer<UInt64>?, Int, Int, UInt64, UInt64) -> Result
    let cuMemAddressFree: @convention(c) (UInt64, Int) -> Result
    let cuMemMap: @convention(c) (UInt64, Int, Int, UInt64, UInt64) -> Result
    let cuMemUnmap: @convention(c) (UInt64, Int) -> Result
    let cuMemSetAccess: @convention(c) (UInt64, Int, UnsafePointer<Int32>?, Int) -> Result
    let cuMemRelease: @convention(c) (UInt64) -> Result

    init(_ library: DynamicLibrary) throws {
        cuMemGetAddressRange = try library.function("cuMemGetAddressRange_v2", "cuMemGetAddressRange")
        cuMemRetainAllocationHandle = try library.function("cuMemRetainAllocationHandle")
        cuMemExportToShareableHandle = try library.function("cuMemExportToShareableHandle")
        cuMemImportFromShareableHandle = try library.function("cuMemImportFromShareableHandle")
        cuMemAddressReserve = try library.function("cuMemAddressReserve")
        cuMemAddressFree = try library.function("cuMemAddressFree")
        cuMemMap = try library.function("cuMemMap")
        cuMemUnmap = try library.function("cuMemUnmap")
        cuMemSetAccess = try library.function("cuMemSetAccess")
        cuMemRelease = try library.function("cuMemRelease")
    }
}

/// An allocation exported for another process: a file descriptor of this process and the
/// allocation's size. The descriptor means something only to a process it is passed to (over a
/// Unix domain socket with `SCM_RIGHTS`: `DescriptorExchange`).
public struct ExportedAllocation: Sendable, Hashable {
    public var fileDescriptor: Int32
    public var byteCount: Int
}

extension DriverLibrary {
    static let posixFileDescriptorHandle: Int32 = 1   // CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR

    /// Exports the `cuMemCreate` allocation that starts at `pointer` as a POSIX file descriptor
    /// (close it when the peers have taken it).
    public func exportAllocation(_ pointer: DevicePointer) throws -> ExportedAllocation {
        let vmm = try self.vmm()
        var base: UInt64 = 0, size = 0
        try check(vmm.cuMemGetAddressRange(&base, &size, pointer.rawValue), "cuMemGetAddressRange")
        guard base == pointer.rawValue else {
            throw CUDAError.driver(call: "exportAllocation", code: 1, name: "CUDA_ERROR_INVALID_VALUE (\(pointer) is inside the allocation at \(DevicePointer(rawValue: base)))")
        }
        var handle: UInt64 = 0
        try check(vmm.cuMemRetainAllocationHandle(&handle, UnsafeMutableRawPointer(bitPattern: UInt(base))), "cuMemRetainAllocationHandle")
        defer { _ = vmm.cuMemRelease(handle) }
        var descriptor: Int32 = -1
        try check(vmm.cuMemExportToShareableHandle(&descriptor, handle, Self.posixFileDescriptorHandle, 0), "cuMemExportToShareableHandle")
        return ExportedAllocation(fileDescriptor: descriptor, byteCount: size)
    }

    /// Maps an allocation another process exported (its descriptor already taken into this
    /// process) into this context, readable and writable by device `ordinal`. The mapping keeps
    /// the memory alive even after the exporting process exits; `unmapImported` ends it.
    public func importAllocation(fileDescriptor: Int32, byteCount: Int, deviceOrdinal: Int) throws -> DevicePointer {
        let vmm = try self.vmm()
        return try LaunchGate.turn { try importAllocation(vmm, fileDescriptor: fileDescriptor, byteCount: byteCount, deviceOrdinal: deviceOrdinal) }
    }

    private func importAllocation(_ vmm: DriverVMMFunctions, fileDescriptor: Int32, byteCount: Int, deviceOrdinal: Int) throws -> DevicePointer {
        var handle: UInt64 = 0
        try check(
            vmm.cuMemImportFromShareableHandle(&handle, UnsafeMutableRawPointer(bitPattern: UInt(fileDescriptor)), Self.posixFileDescriptorHandle),
            "cuMemImportFromShareableHandle")
        defer { _ = vmm.cuMemRelease(handle) }   // the mapping holds its own reference
        var address: UInt64 = 0
        try check(vmm.cuMemAddressReserve(&address, byteCount, 0, 0, 0), "cuMemAddressReserve")
        do {
            try check(vmm.cuMemMap(address, byteCount, 0, handle, 0), "cuMemMap")
            // CUmemAccessDesc { CUmemLocation { DEVICE = 1, ordinal }, PROT_READWRITE = 3 }
            let access: [Int32] = [1, Int32(deviceOrdinal), 3]
            let result = vmm.cuMemSetAccess(address, byteCount, access, 1)
            if result != DriverResult.success { _ = vmm.cuMemUnmap(address, byteCount) }
            try check(result, "cuMemSetAccess")
        } catch {
            _ = vmm.cuMemAddressFree(address, byteCount)
            throw error
        }
        return DevicePointer(rawValue: address)
    }

    /// Ends a mapping made by `importAllocation` (taking its turn with per-rank launch loops, as
    /// `free` does).
    public func unmapImported(_ pointer: DevicePointer, byteCount: Int) throws {
        let vmm = try self.vmm()
        try LaunchGate.turn {
            try check(vmm.cuMemUnmap(pointer.rawValue, byteCount), "cuMemUnmap")
            try check(vmm.cuMemAddressFree(pointer.rawValue, byteCount), "cuMemAddressFree")
        }
    }
}
