/// CUDA graphs captured from a stream.
extension DriverLibrary {
    /// Runs `body` with this thread's stream capture mode set to `mode`
    /// (`cuThreadExchangeStreamCaptureMode`), then restores it. With `.relaxed`, a control-path
    /// call here (a synchronous copy, a stream synchronisation) is allowed while another thread
    /// captures a CUDA graph in global mode (PyTorch's default), and does not invalidate it.
    public func withCaptureMode<T, E: Error>(_ mode: StreamCaptureMode, _ body: () throws(E) -> T) throws -> T {
        var previous = mode.rawValue
        try check(functions.cuThreadExchangeStreamCaptureMode(&previous), "cuThreadExchangeStreamCaptureMode")
        defer { _ = functions.cuThreadExchangeStreamCaptureMode(&previous) }
        return try body()
    }

    /// `cuStreamBeginCapture_v2`.
    public func beginCapture(on stream: CUDAStream, mode: StreamCaptureMode = .threadLocal) throws {
        try check(functions.cuStreamBeginCapture(stream.rawValue, mode.rawValue), "cuStreamBeginCapture")
    }

    /// `cuStreamEndCapture`.
    public func endCapture(on stream: CUDAStream) throws -> CUDAGraph {
        var graph: OpaquePointer?
        try check(functions.cuStreamEndCapture(stream.rawValue, &graph), "cuStreamEndCapture")
        return CUDAGraph(rawValue: try nonNull(graph, "cuStreamEndCapture"))
    }

    /// `cuGraphInstantiateWithFlags`.
    public func instantiate(_ graph: CUDAGraph, flags: GraphInstantiateFlags = []) throws -> CUDAGraphExec {
        var exec: OpaquePointer?
        try check(functions.cuGraphInstantiate(&exec, graph.rawValue, flags.rawValue), "cuGraphInstantiateWithFlags")
        return CUDAGraphExec(rawValue: try nonNull(exec, "cuGraphInstantiateWithFlags"))
    }

    /// `cuGraphLaunch`.
    public func launch(_ graph: CUDAGraphExec, on stream: CUDAStream) throws {
        try check(functions.cuGraphLaunch(graph.rawValue, stream.rawValue), "cuGraphLaunch")
    }

    /// `cuGraphExecDestroy`.
    public func destroy(_ graph: CUDAGraphExec) throws {
        try check(functions.cuGraphExecDestroy(graph.rawValue), "cuGraphExecDestroy")
    }

    /// `cuGraphDestroy`.
    public func destroy(_ graph: CUDAGraph) throws {
        try check(functions.cuGraphDestroy(graph.rawValue), "cuGraphDestroy")
    }
}
