import ExpertParallelCUDA
import ExpertParallelGPU

/// How the GPU benchmark times calls on one stream: enqueued behind a hold of the stream (a delay
/// kernel), so that the CUDA events around each call time the GPU and not the host's pace; and
/// replayed from a CUDA graph, where no event comes between the calls.
struct StreamTimer {
    var device: GPUDevice
    var stream: CUDAStream

    /// Enqueues `enqueue(i)` for every i in `0..<count`, `batch` at a time, each batch behind a
    /// hold of the stream, and waits for them to run. `first(i)` is the first event `enqueue(i)`
    /// records. A batch whose first event has already completed when the batch is enqueued ran
    /// while the host was still enqueueing it (its events timed the host's pace): it runs again
    /// behind a hold four times longer, `runs` runs at most (the first hold `hold` nanoseconds).
    /// Batches keep the enqueued work within what the driver's queue holds: 200 ll-1 iterations
    /// enqueued at once blocked the host until the hold ended. Returns whether every batch ran
    /// held (false: some times may be the host's pace).
    @discardableResult
    func held(_ count: Int, batch: Int = 25, hold firstHold: UInt64 = 20_000_000, runs: Int = 3, first: (Int) -> CUDAEvent,
              _ enqueue: (Int) throws -> Void) throws -> Bool {
        let driver = device.driver
        var hold = firstHold, allHeld = true
        for start in stride(from: 0, to: count, by: batch) {
            for run in 1...runs {
                try device.delay(stream, nanoseconds: hold)
                for i in start..<min(count, start + batch) { try enqueue(i) }
                let caughtUp = try driver.isComplete(first(start))
                try driver.synchronize(stream)
                if !caughtUp { break }
                if run == runs { allHeld = false } else { hold *= 4 }
            }
        }
        return allHeld
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
        let events = try (0..<(2 * replays)).map { _ in try driver.createEvent() }
        defer { for e in events { try? driver.destroy(e) } }
        try held(replays, batch: 2, first: { events[2 * $0] }) { i in
            try driver.record(events[2 * i], on: stream)
            try driver.launch(exec, on: stream)
            try driver.record(events[2 * i + 1], on: stream)
        }
        let perCall = try (0..<replays).map { i in
            Double(try driver.elapsedMilliseconds(from: events[2 * i], to: events[2 * i + 1])) * 1000 / Double(calls)
        }
        return PhaseStats(perCall).median
    }
}
