/// NCCL's memory calls: `ncclMemAlloc` (a `cuMemCreate` allocation NCCL can share with its
/// peers) and window registration (NCCL 2.27+), which makes a buffer part of the communicator's
/// symmetric memory. Optional symbols: an older NCCL fails only these calls.
struct NCCLMemoryFunctions {
    let ncclMemAlloc: @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>?, Int) -> Int32
    let ncclMemFree: @convention(c) (UnsafeMutableRawPointer?) -> Int32
    let ncclCommWindowRegister: @convention(c) (OpaquePointer?, UnsafeMutableRawPointer?, Int, UnsafeMutablePointer<OpaquePointer?>?, Int32) -> Int32
    let ncclCommWindowDeregister: @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32

    init(_ library: DynamicLibrary) throws {
        ncclMemAlloc = try library.function("ncclMemAlloc")
        ncclMemFree = try library.function("ncclMemFree")
        ncclCommWindowRegister = try library.function("ncclCommWindowRegister")
        ncclCommWindowDeregister = try library.function("ncclCommWindowDeregister")
    }
}

/// An `ncclWindow_t`.
public struct NCCLWindow: RawRepresentable, Hashable, @unchecked Sendable {
    public var rawValue: OpaquePointer
    public init(rawValue: OpaquePointer) { self.rawValue = rawValue }
}

extension NCCLLibrary {
    /// `ncclMemAlloc`: device memory of the current device that NCCL (and `exportAllocation`)
    /// can share with other processes (taking its turn with per-rank launch loops, LaunchGate.swift).
    public func memAlloc(byteCount: Int) throws -> DevicePointer {
        var pointer: UnsafeMutableRawPointer?
        let alloc = try memory().ncclMemAlloc
        try LaunchGate.turn { try check(alloc(&pointer, byteCount), "ncclMemAlloc") }
        guard let pointer else { throw CUDAError.nccl(call: "ncclMemAlloc", code: 3, name: "ncclInternalError \"no memory returned\"") }
        return DevicePointer(rawValue: UInt64(UInt(bitPattern: pointer)))
    }

    /// `ncclMemFree`, taking its turn with per-rank launch loops as `DriverLibrary.free` does.
    public func memFree(_ pointer: DevicePointer) throws {
        let free = try memory().ncclMemFree
        try LaunchGate.turn { try check(free(UnsafeMutableRawPointer(bitPattern: UInt(pointer.rawValue))), "ncclMemFree") }
    }

    /// `ncclCommWindowRegister` (collective: every rank registers a buffer of the same size),
    /// waited for at most `timeout`. A non-blocking communicator writes the window when the
    /// registration completes, so the out-parameter lives on the heap; after a timeout it is
    /// left to NCCL (a few bytes) and the caller aborts the communicator.
    public func registerWindow(_ comm: NCCLComm, _ pointer: DevicePointer, byteCount: Int, timeout: Duration) throws -> NCCLWindow {
        let out = UnsafeMutablePointer<OpaquePointer?>.allocate(capacity: 1)
        out.initialize(to: nil)
        let result = try memory().ncclCommWindowRegister(comm.rawValue, UnsafeMutableRawPointer(bitPattern: UInt(pointer.rawValue)), byteCount, out, 0)
        if result != NCCLResult.inProgress {
            do { try check(result, "ncclCommWindowRegister") } catch { out.deallocate(); throw error }
        }
        try waitReady(comm, timeout: timeout, call: "ncclCommWindowRegister", waitingFor: "every rank to register its window")
        defer { out.deallocate() }
        guard let window = out.pointee else { throw CUDAError.nccl(call: "ncclCommWindowRegister", code: 3, name: "ncclInternalError \"no window returned\"") }
        return NCCLWindow(rawValue: window)
    }

    /// `ncclCommWindowDeregister` (collective).
    public func deregisterWindow(_ comm: NCCLComm, _ window: NCCLWindow) throws {
        let result = try memory().ncclCommWindowDeregister(comm.rawValue, window.rawValue)
        if result != NCCLResult.inProgress { try check(result, "ncclCommWindowDeregister") }
    }
}
