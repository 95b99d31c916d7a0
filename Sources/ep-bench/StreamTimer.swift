import ExpertParallelCUDA
import ExpertParallelGPU

/// How the GPU benchmark times calls on one stream: enqueued behind a hold of the stream (a delay
/// kernel), so that the CUDA events around each call time the GPU and not the host's pace; and
/// replayed from a CUDA graph, where no event comes between the calls.
struct StreamTimer {
    var device: GPUDevice
    var stream: CUDAStream

    /// Enqueues `body` behind a hold of the stream and waits for it to run. `first` is the first
    /// event `body` records: where it has already completed when `body` returns, the hold ran out
    /// while the host was still enqueueing, and the events after it timed the host's pace. Then
    /// `body` runs again behind a hold four times longer, up to three runs in all. Returns whether
    /// the last run's hold outlasted the enqueueing (false: its times may be the host's pace).
    @discardableResult
    func held(first: CUDAEvent, _ body: () throws -> Void) throws -> Bool {
        let driver = device.driver
        var hold: UInt64 = 200_000_000
        for _ in 1...3 {
            try device.delay(stream, nanoseconds: hold)
            try body()
            let caughtUp = try driver.isComplete(first)
            try driver.synchronize(stream)
            if !caughtUp { return true }
            hold *= 4
        }
        return false
    }

    /// Per-call GPU time (µs) of `call`, with `calls` of them captured in one CUDA graph and the
    /// graph replayed `replays` times behind a hold: the median replay ÷ `calls`. No event comes
    /// between the calls, as where a framework replays its step as a graph (a decode step in
    /// vLLM or SGLang); the events around each call, which the other figures read, cost the GPU
    /// some µs of its own between short kernels.
    func perCallInGraph(calls: Int, replays: Int, _ call: () throws -> Void) throws -> Double {
        let driver = device.driver
        try driver.beginCapture(on: stream)
        do {
            for _ in 0..<calls { try call() }
        } catch {
            if let graph = try? driver.endCapture(on: stream) { try? driver.destroy(graph) }
            throw error
        }
        let graph = try driver.endCapture(on: stream)
        defer { try? driver.destroy(graph) }
        let exec = try driver.instantiate(graph)
        defer { try? driver.destroy(exec) }
        try driver.launch(exec, on: stream)   // the first launch uploads the graph
        try driver.synchronize(stream)
        let events = try (0...replays).map { _ in try driver.createEvent() }
        defer { for e in events { try? driver.destroy(e) } }
        try held(first: events[0]) {
            for i in 0..<replays {
                try driver.record(events[i], on: stream)
                try driver.launch(exec, on: stream)
            }
            try driver.record(events[replays], on: stream)
        }
        let perCall = try (0..<replays).map { i in
            Double(try driver.elapsedMilliseconds(from: events[i], to: events[i + 1])) * 1000 / Double(calls)
        }
        return PhaseStats(perCall).median
    }
}
