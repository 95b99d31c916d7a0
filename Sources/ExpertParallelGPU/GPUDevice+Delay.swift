import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelKernels

extension GPUDevice {
    /// Enqueues a one-thread kernel that keeps `stream` busy for `nanoseconds`, so that work
    /// enqueued behind it runs back to back and events time the GPU alone (benchmarks only).
    /// At most `maxDelayNanoseconds`: a longer hold would be a stream that never frees.
    public func delay(_ stream: CUDAStream, nanoseconds: UInt64) throws(EPError) {
        guard nanoseconds <= Self.maxDelayNanoseconds else {
            throw .invalidArgument(field: "nanoseconds", value: "\(nanoseconds)",
                                   requirement: "must be ≤ \(Self.maxDelayNanoseconds) (60 s): a delay holds the stream, longer would look like a hang")
        }
        try makeCurrent()
        let function = try delayFunction()
        try gpu { try driver.launch(function, grid: 1, block: 1, stream: stream, arguments: KernelArguments(nanoseconds)) }
    }

    /// The longest `delay`: 60 s (ep-bench holds a stream for at most a third of a second).
    public static let maxDelayNanoseconds: UInt64 = 60_000_000_000

    /// The delay kernel, loaded once.
    private func delayFunction() throws(EPError) -> CUDAFunction {
        rankStreamLock.lock()
        defer { rankStreamLock.unlock() }
        if let loaded = delayKernel { return loaded }
        let compiled = try gpu { try compiler.compile(KernelSource.embedded("ep_delay"), arch: arch) }
        let module = try gpu { try driver.loadModule(image: compiled.image) }
        let function = try gpu { try driver.function(named: "ep_delay", in: module) }
        delayKernel = function
        return function
    }
}
