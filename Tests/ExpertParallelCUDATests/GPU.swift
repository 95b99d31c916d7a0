import ExpertParallelCUDA
import ExpertParallelKernels

/// The first GPU with its primary context current on the calling thread (GPU tests are
/// synchronous, so the thread does not change under them).
struct GPU {
    let driver: DriverLibrary
    let device: CUDADevice
    let arch: GPUArch
    let multiprocessors: Int

    init() throws {
        driver = try DriverLibrary.shared()
        try driver.initialize()
        device = try driver.device(ordinal: 0)
        try driver.setCurrent(try driver.retainPrimaryContext(of: device))
        arch = try driver.computeCapability(of: device).nativeArch
        multiprocessors = try driver.attribute(.multiprocessorCount, of: device)
    }

    /// Compiles (through the shared cache) and loads a kernel source.
    func load(_ source: KernelSource, defines: [String: String] = [:]) throws -> CUDAModule {
        let kernel = try KernelCompiler.shared().compile(source, arch: arch, defines: defines)
        return try driver.loadModule(image: kernel.image)
    }

    /// Loads `source` and finds kernel `name` in it; unload the module when done.
    func kernel(_ name: String, in source: KernelSource) throws -> (module: CUDAModule, function: CUDAFunction) {
        let module = try load(source)
        return (module, try driver.function(named: name, in: module))
    }

    /// A grid-stride launch size for `count` items.
    func grid(for count: Int, block: Int = 256) -> LaunchDimensions {
        LaunchDimensions(x: UInt32(max(1, min((count + block - 1) / block, multiprocessors * 8))))
    }

    /// Device memory holding `elements`; free with `driver.free`.
    func upload<Element: BitwiseCopyable>(_ elements: [Element]) throws -> DevicePointer {
        let pointer = try driver.allocate(byteCount: max(1, elements.count * MemoryLayout<Element>.stride))
        try driver.copy(elements, to: pointer)
        return pointer
    }
}
