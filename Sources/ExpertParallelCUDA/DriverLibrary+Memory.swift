/// Device and pinned host memory, copies and fills. A nil `stream` means the synchronous
/// call; a stream means the `…Async` one, ordered on that stream.
extension DriverLibrary {
    /// `cuMemAlloc_v2`, taking its turn with per-rank launch loops (LaunchGate.swift).
    public func allocate(byteCount: Int) throws -> DevicePointer {
        var pointer: UInt64 = 0
        try LaunchGate.turn { try check(functions.cuMemAlloc(&pointer, byteCount), "cuMemAlloc") }
        return DevicePointer(rawValue: pointer)
    }

    /// `cuMemFree_v2`, taking its turn with per-rank launch loops (LaunchGate.swift: a free
    /// between a call's per-rank launches holds its last ranks back until the timeout).
    public func free(_ pointer: DevicePointer) throws {
        try LaunchGate.turn { try check(functions.cuMemFree(pointer.rawValue), "cuMemFree") }
    }

    /// `cuMemAllocHost_v2`: page-locked host memory, which async copies need to be asynchronous
    /// (taking its turn with per-rank launch loops).
    public func allocateHost(byteCount: Int) throws -> UnsafeMutableRawPointer {
        var pointer: UnsafeMutableRawPointer?
        try LaunchGate.turn { try check(functions.cuMemAllocHost(&pointer, byteCount), "cuMemAllocHost") }
        return try nonNull(pointer, "cuMemAllocHost")
    }

    /// `cuMemFreeHost`, taking its turn with per-rank launch loops as `free` does.
    public func freeHost(_ pointer: UnsafeMutableRawPointer) throws {
        try LaunchGate.turn { try check(functions.cuMemFreeHost(pointer), "cuMemFreeHost") }
    }

    /// `cuMemGetInfo_v2` for the current context: free and total bytes.
    public func memoryInfo() throws -> (free: Int, total: Int) {
        var free = 0
        var total = 0
        try check(functions.cuMemGetInfo(&free, &total), "cuMemGetInfo")
        return (free, total)
    }

    /// `cuMemcpyHtoD_v2` / `cuMemcpyHtoDAsync_v2`.
    public func copy(from source: UnsafeRawPointer, to destination: DevicePointer, byteCount: Int, stream: CUDAStream? = nil) throws {
        if let stream {
            try check(functions.cuMemcpyHtoDAsync(destination.rawValue, source, byteCount, stream.rawValue), "cuMemcpyHtoDAsync")
        } else {
            try check(functions.cuMemcpyHtoD(destination.rawValue, source, byteCount), "cuMemcpyHtoD")
        }
    }

    /// `cuMemcpyDtoH_v2` / `cuMemcpyDtoHAsync_v2`.
    public func copy(from source: DevicePointer, to destination: UnsafeMutableRawPointer, byteCount: Int, stream: CUDAStream? = nil) throws {
        if let stream {
            try check(functions.cuMemcpyDtoHAsync(destination, source.rawValue, byteCount, stream.rawValue), "cuMemcpyDtoHAsync")
        } else {
            try check(functions.cuMemcpyDtoH(destination, source.rawValue, byteCount), "cuMemcpyDtoH")
        }
    }

    /// `cuMemcpyDtoD_v2` / `cuMemcpyDtoDAsync_v2`.
    public func copy(from source: DevicePointer, to destination: DevicePointer, byteCount: Int, stream: CUDAStream? = nil) throws {
        if let stream {
            try check(functions.cuMemcpyDtoDAsync(destination.rawValue, source.rawValue, byteCount, stream.rawValue), "cuMemcpyDtoDAsync")
        } else {
            try check(functions.cuMemcpyDtoD(destination.rawValue, source.rawValue, byteCount), "cuMemcpyDtoD")
        }
    }

    /// `cuMemsetD8_v2` / `cuMemsetD8Async`.
    public func fill(_ destination: DevicePointer, byte value: UInt8, byteCount: Int, stream: CUDAStream? = nil) throws {
        if let stream {
            try check(functions.cuMemsetD8Async(destination.rawValue, value, byteCount, stream.rawValue), "cuMemsetD8Async")
        } else {
            try check(functions.cuMemsetD8(destination.rawValue, value, byteCount), "cuMemsetD8")
        }
    }

    /// Copies an array to device memory (synchronously).
    public func copy<Element: BitwiseCopyable>(_ elements: [Element], to destination: DevicePointer) throws {
        try elements.withUnsafeBytes { bytes in
            guard let base = bytes.baseAddress else { return }
            try copy(from: base, to: destination, byteCount: bytes.count)
        }
    }

    /// Reads `count` elements from device memory (synchronously).
    public func read<Element: BitwiseCopyable>(_ type: Element.Type = Element.self, from source: DevicePointer, count: Int) throws -> [Element] {
        try [Element](unsafeUninitializedCapacity: count) { buffer, initialized in
            if count > 0, let base = buffer.baseAddress {
                try copy(from: source, to: UnsafeMutableRawPointer(base), byteCount: count * MemoryLayout<Element>.stride)
            }
            initialized = count
        }
    }
}
