/// Modules, kernels and launches.
extension DriverLibrary {
    /// `cuModuleLoadData` from a CUBIN, or from PTX that ends in a NUL byte.
    public func loadModule(image: [UInt8]) throws -> CUDAModule {
        var module: OpaquePointer?
        try LaunchGate.turn {
            try image.withUnsafeBytes { bytes in
                try check(functions.cuModuleLoadData(&module, bytes.baseAddress), "cuModuleLoadData")
            }
        }
        return CUDAModule(rawValue: try nonNull(module, "cuModuleLoadData"))
    }

    /// `cuModuleUnload`.
    public func unload(_ module: CUDAModule) throws {
        try LaunchGate.turn { try check(functions.cuModuleUnload(module.rawValue), "cuModuleUnload") }
    }

    /// `cuModuleGetFunction`; kernels are declared `extern "C"` so `name` is the source name.
    public func function(named name: String, in module: CUDAModule) throws -> CUDAFunction {
        var function: OpaquePointer?
        try check(functions.cuModuleGetFunction(&function, module.rawValue, name), "cuModuleGetFunction")
        return CUDAFunction(rawValue: try nonNull(function, "cuModuleGetFunction"))
    }

    /// `cuFuncLoad` where the driver has it (CUDA 12.4+): the function's code is on the device
    /// when this returns, so its first launch cannot stop to load it (under lazy loading, the
    /// default since CUDA 12.2, that load may wait for the whole context). Nothing without it.
    public func load(_ function: CUDAFunction) throws {
        guard let load = functions.cuFuncLoad else { return }
        try LaunchGate.turn { try check(load(function.rawValue), "cuFuncLoad") }
    }

    /// `cuModuleGetGlobal_v2`: address and size of a `__device__` variable.
    public func global(named name: String, in module: CUDAModule) throws -> (pointer: DevicePointer, byteCount: Int) {
        var pointer: UInt64 = 0
        var bytes = 0
        try check(functions.cuModuleGetGlobal(&pointer, &bytes, module.rawValue, name), "cuModuleGetGlobal")
        return (DevicePointer(rawValue: pointer), bytes)
    }

    /// `cuFuncSetAttribute`, e.g. `.maxDynamicSharedSizeBytes` before a launch that needs
    /// more than 48 KB of dynamic shared memory.
    public func setAttribute(_ attribute: FunctionAttribute, to value: Int, for function: CUDAFunction) throws {
        try check(functions.cuFuncSetAttribute(function.rawValue, attribute.rawValue, Int32(value)), "cuFuncSetAttribute")
    }

    /// `cuFuncGetAttribute`, e.g. `.numRegisters`.
    public func attribute(_ attribute: FunctionAttribute, of function: CUDAFunction) throws -> Int {
        var value: Int32 = 0
        try check(functions.cuFuncGetAttribute(&value, attribute.rawValue, function.rawValue), "cuFuncGetAttribute")
        return Int(value)
    }

    /// `cuOccupancyMaxActiveBlocksPerMultiprocessor`.
    public func maxActiveBlocksPerMultiprocessor(_ function: CUDAFunction, blockSize: Int, dynamicSharedBytes: Int = 0) throws -> Int {
        var blocks: Int32 = 0
        try check(
            functions.cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, function.rawValue, Int32(blockSize), dynamicSharedBytes),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor")
        return Int(blocks)
    }

    /// `cuLaunchKernel` with arguments packed by `KernelArguments` (in the kernel's parameter order).
    public func launch(
        _ function: CUDAFunction, grid: LaunchDimensions, block: LaunchDimensions,
        sharedMemoryBytes: Int = 0, stream: CUDAStream = .legacyDefault, arguments: KernelArguments
    ) throws {
        try arguments.withParameterArray { parameters in
            try launch(function, grid: grid, block: block, sharedMemoryBytes: sharedMemoryBytes, stream: stream, parameters: parameters)
        }
    }

    /// `cuLaunchKernel` with a raw `void**` parameter array: entry i points at argument i.
    public func launch(
        _ function: CUDAFunction, grid: LaunchDimensions, block: LaunchDimensions,
        sharedMemoryBytes: Int = 0, stream: CUDAStream = .legacyDefault,
        parameters: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) throws {
        try check(
            functions.cuLaunchKernel(
                function.rawValue, grid.x, grid.y, grid.z, block.x, block.y, block.z,
                UInt32(sharedMemoryBytes), stream.rawValue, parameters, nil),
            "cuLaunchKernel")
    }
}
