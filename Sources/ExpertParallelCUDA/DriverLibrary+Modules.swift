import CExpertParallelShim

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

    /// Whether `launch(..., dependent: true, ...)` can launch as a programmatic dependent launch
    /// here: the driver has `cuLaunchKernelEx` and is CUDA 12.3 or later (stream capture keeps
    /// such launches' edges from 12.3 on), and the device is compute capability 9.0 or later.
    public func launchesDependents(computeCapabilityMajor major: Int) -> Bool {
        guard functions.cuLaunchKernelEx != nil, major >= 9, let version = try? driverVersion() else { return false }
        return version >= 12_030
    }

    /// `cuLaunchKernelEx` with `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION` where
    /// `dependent` (the caller checked `launchesDependents`), else `cuLaunchKernel`. A dependent
    /// launch may start its blocks while the previous kernel in the stream still runs, once that
    /// kernel's blocks have all executed `griddepcontrol.launch_dependents` (or exited); the
    /// kernel must execute `griddepcontrol.wait` before it touches memory the previous kernels
    /// write or read. Launched without the attribute, that wait returns at once.
    public func launch(
        _ function: CUDAFunction, grid: LaunchDimensions, block: LaunchDimensions, sharedMemoryBytes: Int = 0, stream: CUDAStream,
        dependent: Bool, parameters: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) throws {
        guard dependent, let launchEx = functions.cuLaunchKernelEx else {
            try launch(function, grid: grid, block: block, sharedMemoryBytes: sharedMemoryBytes, stream: stream, parameters: parameters)
            return
        }
        var attribute = ep_cu_launch_attribute()
        attribute.id = UInt32(EP_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
        attribute.value.programmaticStreamSerializationAllowed = 1
        try withUnsafeMutablePointer(to: &attribute) { attributes in
            var config = ep_cu_launch_config(
                gridDimX: grid.x, gridDimY: grid.y, gridDimZ: grid.z, blockDimX: block.x, blockDimY: block.y, blockDimZ: block.z,
                sharedMemBytes: UInt32(sharedMemoryBytes), hStream: UnsafeMutableRawPointer(stream.rawValue), attrs: attributes, numAttrs: 1)
            try check(launchEx(&config, function.rawValue, parameters, nil), "cuLaunchKernelEx")
        }
    }
}
