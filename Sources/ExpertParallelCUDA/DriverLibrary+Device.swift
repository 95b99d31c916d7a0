/// Devices and their primary contexts.
extension DriverLibrary {
    /// `cuDeviceGetCount`.
    public func deviceCount() throws -> Int {
        var count: Int32 = 0
        try check(functions.cuDeviceGetCount(&count), "cuDeviceGetCount")
        return Int(count)
    }

    /// `cuDeviceGet`.
    public func device(ordinal: Int) throws -> CUDADevice {
        var device: Int32 = 0
        try check(functions.cuDeviceGet(&device, Int32(ordinal)), "cuDeviceGet")
        return CUDADevice(rawValue: device)
    }

    /// `cuDeviceGetName`.
    public func name(of device: CUDADevice) throws -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        try check(functions.cuDeviceGetName(&buffer, Int32(buffer.count), device.rawValue), "cuDeviceGetName")
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// `cuDeviceGetPCIBusId`, e.g. `0000:19:00.0`.
    public func pciBusID(of device: CUDADevice) throws -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        try check(functions.cuDeviceGetPCIBusId(&buffer, Int32(buffer.count), device.rawValue), "cuDeviceGetPCIBusId")
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// `cuDeviceGetAttribute`.
    public func attribute(_ attribute: DeviceAttribute, of device: CUDADevice) throws -> Int {
        var value: Int32 = 0
        try check(functions.cuDeviceGetAttribute(&value, attribute.rawValue, device.rawValue), "cuDeviceGetAttribute")
        return Int(value)
    }

    /// Compute capability from the two `cuDeviceGetAttribute` queries.
    public func computeCapability(of device: CUDADevice) throws -> ComputeCapability {
        ComputeCapability(
            major: try attribute(.computeCapabilityMajor, of: device),
            minor: try attribute(.computeCapabilityMinor, of: device))
    }

    /// `cuDeviceTotalMem_v2`, in bytes.
    public func totalMemory(of device: CUDADevice) throws -> Int {
        var bytes = 0
        try check(functions.cuDeviceTotalMem(&bytes, device.rawValue), "cuDeviceTotalMem")
        return bytes
    }

    /// `cuDevicePrimaryCtxRetain`; balance with `releasePrimaryContext(of:)`.
    public func retainPrimaryContext(of device: CUDADevice) throws -> CUDAContext {
        var context: OpaquePointer?
        try check(functions.cuDevicePrimaryCtxRetain(&context, device.rawValue), "cuDevicePrimaryCtxRetain")
        return try CUDAContext(rawValue: nonNull(context, "cuDevicePrimaryCtxRetain"))
    }

    /// `cuDevicePrimaryCtxRelease_v2`.
    public func releasePrimaryContext(of device: CUDADevice) throws {
        try check(functions.cuDevicePrimaryCtxRelease(device.rawValue), "cuDevicePrimaryCtxRelease")
    }

    /// `cuCtxSetCurrent`: binds the context to the calling thread.
    public func setCurrent(_ context: CUDAContext?) throws {
        try check(functions.cuCtxSetCurrent(context?.rawValue), "cuCtxSetCurrent")
    }

    /// `cuCtxGetCurrent`: the calling thread's context, nil if none.
    public func currentContext() throws -> CUDAContext? {
        var context: OpaquePointer?
        try check(functions.cuCtxGetCurrent(&context), "cuCtxGetCurrent")
        return context.map(CUDAContext.init(rawValue:))
    }

    /// `cuCtxSynchronize`: waits for all work in the current context.
    public func synchronizeContext() throws {
        try check(functions.cuCtxSynchronize(), "cuCtxSynchronize")
    }

    /// A handle the driver returned through an out-parameter on success must not be null.
    func nonNull<Handle>(_ handle: Handle?, _ call: StaticString) throws -> Handle {
        guard let handle else { throw CUDAError.driver(call: "\(call)", code: -1, name: "returned a null handle") }
        return handle
    }
}
