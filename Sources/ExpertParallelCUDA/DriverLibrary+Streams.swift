/// Streams and events.
extension DriverLibrary {
    /// `cuStreamCreate`.
    public func createStream(flags: StreamFlags = .nonBlocking) throws -> CUDAStream {
        var stream: OpaquePointer?
        try check(functions.cuStreamCreate(&stream, flags.rawValue), "cuStreamCreate")
        return CUDAStream(rawValue: stream)
    }

    /// `cuStreamSynchronize`.
    public func synchronize(_ stream: CUDAStream) throws {
        try check(functions.cuStreamSynchronize(stream.rawValue), "cuStreamSynchronize")
    }

    /// `cuStreamDestroy_v2`.
    public func destroy(_ stream: CUDAStream) throws {
        try check(functions.cuStreamDestroy(stream.rawValue), "cuStreamDestroy")
    }

    /// `cuStreamWaitEvent`: later work on `stream` waits for `event`.
    public func wait(_ stream: CUDAStream, for event: CUDAEvent) throws {
        try check(functions.cuStreamWaitEvent(stream.rawValue, event.rawValue, 0), "cuStreamWaitEvent")
    }

    /// `cuEventCreate`.
    public func createEvent(flags: EventFlags = []) throws -> CUDAEvent {
        var event: OpaquePointer?
        try check(functions.cuEventCreate(&event, flags.rawValue), "cuEventCreate")
        return CUDAEvent(rawValue: try nonNull(event, "cuEventCreate"))
    }

    /// `cuEventRecord`.
    public func record(_ event: CUDAEvent, on stream: CUDAStream) throws {
        try check(functions.cuEventRecord(event.rawValue, stream.rawValue), "cuEventRecord")
    }

    /// `cuEventSynchronize`.
    public func synchronize(_ event: CUDAEvent) throws {
        try check(functions.cuEventSynchronize(event.rawValue), "cuEventSynchronize")
    }

    /// `cuEventQuery`: true when the event's work is done, false while it is pending.
    public func isComplete(_ event: CUDAEvent) throws -> Bool {
        let result = functions.cuEventQuery(event.rawValue)
        if result == DriverResult.notReady { return false }
        try check(result, "cuEventQuery")
        return true
    }

    /// `cuEventElapsedTime_v2`: milliseconds between two recorded, completed events.
    public func elapsedMilliseconds(from start: CUDAEvent, to end: CUDAEvent) throws -> Float {
        var milliseconds: Float = 0
        try check(functions.cuEventElapsedTime(&milliseconds, start.rawValue, end.rawValue), "cuEventElapsedTime")
        return milliseconds
    }

    /// `cuEventDestroy_v2`.
    public func destroy(_ event: CUDAEvent) throws {
        try check(functions.cuEventDestroy(event.rawValue), "cuEventDestroy")
    }
}
