import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelKernels
import Foundation

/// One CUDA device with its primary context, the kernel compiler for its architecture, and
/// the facts the backend sizes its launches by.
public final class GPUDevice: @unchecked Sendable {
    public let driver: DriverLibrary
    public let ordinal: Int
    public let device: CUDADevice
    public let context: CUDAContext
    public let name: String
    public let multiprocessors: Int
    public let arch: GPUArch
    /// Whether the step kernels can be launched as programmatic dependent launches here
    /// (compute capability 9.0+, a CUDA 12.3+ driver with `cuLaunchKernelEx`), unless
    /// `EP_SERIAL_LAUNCHES=1`. `GPUTuning.overlapsLaunches` decides per group.
    public let launchesDependents: Bool
    let compiler: KernelCompiler

    /// Opens device `ordinal`. Throws `EPError.lowerLayer` naming the failing call when there is
    /// no driver, no device or no NVRTC.
    public convenience init(ordinal: Int = 0) throws(EPError) {
        // Ranks launched on separate streams wait for each other, so their streams must not
        // share a hardware queue (a shared queue serialises them: a wait that never ends).
        // Ask for the most queues before the driver starts; a caller's own setting wins.
        setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0)
        try self.init(ordinal: ordinal, driver: try gpu { try DriverLibrary.shared() }, compiler: nil)
    }

    /// Opens device `ordinal` through `driver`, compiling with `compiler` (nil:
    /// `KernelCompiler.shared()`, looked for after the device is found). The seam for tests:
    /// a driver and NVRTC built from mock function tables (`DynamicLibrary(name:symbols:)`)
    /// make every failure path of the GPU layer reachable without a GPU.
    package init(ordinal: Int = 0, driver: DriverLibrary, compiler: KernelCompiler?) throws(EPError) {
        do {
            self.driver = driver
            try driver.initialize()
            let count = try driver.deviceCount()
            guard ordinal >= 0, ordinal < count else {
                throw EPError.invalidArgument(field: "device", value: "\(ordinal)", requirement: "must be in 0..<\(count) (devices found)")
            }
            self.ordinal = ordinal
            device = try driver.device(ordinal: ordinal)
            context = try driver.retainPrimaryContext(of: device)
            try driver.setCurrent(context)
            name = try driver.name(of: device)
            multiprocessors = try driver.attribute(.multiprocessorCount, of: device)
            let capability = try driver.computeCapability(of: device)
            arch = capability.nativeArch
            launchesDependents = Environment.value("EP_SERIAL_LAUNCHES") != "1" && driver.launchesDependents(computeCapabilityMajor: capability.major)
            self.compiler = try compiler ?? KernelCompiler.shared()
        } catch {
            throw gpuError(error)
        }
    }

    /// Streams for ranks launched separately, one per rank and shared by every group on the
    /// device: created once, in order, so that up to 32 of them land on distinct hardware queues.
    let rankStreamLock = NSLock()
    nonisolated(unsafe) private var rankStreamPool: [CUDAStream] = []
    /// The benchmark's delay kernel, once loaded (GPUDevice+Delay.swift).
    nonisolated(unsafe) var delayKernel: CUDAFunction?

    func rankStreams(_ count: Int) throws(EPError) -> [CUDAStream] {
        rankStreamLock.lock()
        defer { rankStreamLock.unlock() }
        while rankStreamPool.count < count {
            rankStreamPool.append(try gpu { try driver.createStream() })
        }
        return Array(rankStreamPool.prefix(count))
    }

    /// Makes this device's context current on the calling thread.
    public func makeCurrent() throws(EPError) {
        try gpu { try driver.setCurrent(context) }
    }
}

/// Runs a CUDA-layer call, turning its `CUDAError` into `EPError.lowerLayer` (same library,
/// call, code and text); an `EPError` passes through unchanged.
@inline(__always)
func gpu<T>(_ body: () throws -> T) throws(EPError) -> T {
    do { return try body() } catch { throw gpuError(error) }
}

/// `error` as an `EPError`: unchanged when it is one, typed (`.lowerLayer`) when the CUDA layer
/// threw it (CUDAError+EPError.swift).
func gpuError(_ error: any Error) -> EPError {
    EPError(lowerLayer: error)
}
