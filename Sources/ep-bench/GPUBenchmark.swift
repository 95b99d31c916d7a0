import Foundation
import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU

/// Runs a case on one GPU with R virtual ranks, one launch per call covering all ranks,
/// timed with CUDA events around each call on the group's stream.
struct GPUBenchmark {
    var device: GPUDevice
    var iterations: Int
    var warmup: Int
    var seed: UInt64
    var skew: Double
    var multiprocessors: Int?
    var tuning: GPUTuning

    func run(_ benchCase: BenchCase, copyBandwidth: Double) throws -> Measurement {
        let config = try benchCase.config().validated()
        let group = try VirtualGPUGroup(config, device: device, multiprocessors: multiprocessors, tuning: tuning)
        let data = try BenchData(config: config, tokens: benchCase.tokens, seed: seed, skew: skew)
        let r = config.ranks
        func upload(_ host: HostTensor) throws -> DeviceTensor { try DeviceTensor(uploading: host, on: device) }
        // FP8: the oracle's plain dispatch of the same step (combine's expert outputs, and the
        // reference of the FP8 rows' check) and pass-through's e4m3 rows and scales, untimed.
        let fp8 = try config.fp8.map { _ in try FP8HostData(config: config, data: data) }
        let x = try (fp8?.sourceCodes ?? data.tokens).map(upload), w = try data.weights.map(upload), idx = try data.topkIdx.map(upload)
        let scalesIn = try fp8?.sourceScales?.map(upload)
        let host = try (0..<r).map { _ in try data.outputs(for: config) }
        let received = try host.map { try upload($0.dispatchTokens) }
        let receivedIdx = try host.map { try $0.dispatchIdx.map(upload) }
        let receivedWeights = try host.map { try $0.dispatchWeights.map(upload) }
        let receivedScales = try host.map { try $0.dispatchScales.map(upload) }
        let combined = try host.map { try upload($0.combineTokens) }
        let expertOutputs = try fp8.map { try $0.plainRows.map(upload) } ?? received

        let dispatchIn = (0..<r).map { DispatchInput(tokens: x[$0].ref, topkWeights: w[$0].ref, scales: scalesIn?[$0].ref) }
        let dispatchOut = (0..<r).map {
            DispatchOutput(tokens: received[$0].ref, topkIdx: receivedIdx[$0]?.ref, topkWeights: receivedWeights[$0]?.ref,
                           scales: receivedScales[$0]?.ref)
        }
        // LL expert-major: the source's weights; HT expert-major: the per-slot weights received.
        let combineIn = (0..<r).map {
            CombineInput(expertOutputs: expertOutputs[$0].ref,
                         topkWeights: config.layout == .expertMajor ? w[$0].ref : config.isExpertMajorHT ? receivedWeights[$0]!.ref : nil)
        }
        let combineOut = (0..<r).map { CombineOutput(tokens: combined[$0].ref) }

        let driver = device.driver
        let total = warmup + iterations
        let combines = config.elementType.isFloating
        let events = try (0..<(4 * total)).map { _ in try driver.createEvent() }
        defer { for e in events { try? driver.destroy(e) } }
        func microseconds(_ from: Int, _ to: Int) throws -> [Double] {
            try (warmup..<total).map { i in Double(try driver.elapsedMilliseconds(from: events[4 * i + from], to: events[4 * i + to])) * 1000 }
        }
        let timer = StreamTimer(device: device, stream: group.stream)
        func separateStep() throws {
            try group.update(topkIdx: idx.map(\.ref))
            try group.dispatch(dispatchIn, into: dispatchOut)
            if combines { try group.combine(combineIn, into: combineOut) }
        }
        func fusedStep(_ handle: GPUStepHandle) throws {
            try group.dispatch(handle, topkIdx: idx.map(\.ref), dispatchIn, into: dispatchOut)
            if combines { try group.combine(handle, combineIn, into: combineOut) }
        }
        // Every kernel the loops launch is compiled and loaded before the stream is held: a first
        // call's compilation (NVRTC, most of a second) outlasted the hold, and the events then
        // timed the host's pace, not the GPU (an H200, ll-1 R = 8: dispatch 11-18 µs for a 3.9 µs
        // kernel).
        // One handle serves every fused loop below (LL: update and dispatch as one call).
        let fusedHandle = group.fusesUpdate ? try group.makeHandle() : nil
        defer { fusedHandle?.release() }
        try separateStep()
        if let fusedHandle { try fusedStep(fusedHandle) }
        try driver.synchronize(group.stream)
        // Every call enqueued behind a hold of the stream, so the events time the GPU, not the host.
        var allHeld = try timer.held(total, first: { events[4 * $0] }) { i in
            try driver.record(events[4 * i], on: group.stream)
            try group.update(topkIdx: idx.map(\.ref))
            try driver.record(events[4 * i + 1], on: group.stream)
            try group.dispatch(dispatchIn, into: dispatchOut)
            try driver.record(events[4 * i + 2], on: group.stream)
            if combines { try group.combine(combineIn, into: combineOut) }
            try driver.record(events[4 * i + 3], on: group.stream)
        }
        try group.checkStatus()
        // Read before the events are recorded again below. The step is one reading from before
        // the update to after the combine, per iteration.
        let separate = (update: try microseconds(0, 1), dispatch: try microseconds(1, 2), combine: combines ? try microseconds(2, 3) : nil,
                        step: try microseconds(0, 3))
        // Where the group fuses them (LL), update and dispatch again as one call, then combine:
        // the step a stacked call (the Python package's) takes.
        var fused: (call: [Double], step: [Double])?
        if let handle = fusedHandle {
            allHeld = try timer.held(total, first: { events[4 * $0] }) { i in
                try driver.record(events[4 * i], on: group.stream)
                try group.dispatch(handle, topkIdx: idx.map(\.ref), dispatchIn, into: dispatchOut)
                try driver.record(events[4 * i + 1], on: group.stream)
                if combines { try group.combine(handle, combineIn, into: combineOut) }
                try driver.record(events[4 * i + 2], on: group.stream)
            } && allHeld
            try group.checkStatus()
            fused = (try microseconds(0, 1), try microseconds(0, 2))
        }
        // The step once more in a loop of its own, events only around each iteration: an event
        // between two calls holds the second back some µs (the GPU drains for it; an H200
        // idled 3-5 µs between two ll-1 kernels), which a user's step, whose calls follow one
        // another on the stream, does not pay. The loops above read the step with those events
        // in it (JSON `stepWithPhaseEvents`).
        allHeld = try timer.held(total, first: { events[4 * $0] }) { i in
            try driver.record(events[4 * i], on: group.stream)
            if let fusedHandle { try fusedStep(fusedHandle) } else { try separateStep() }
            try driver.record(events[4 * i + 1], on: group.stream)
        } && allHeld
        try group.checkStatus()
        var samples = PhaseSamples(update: separate.update, dispatch: separate.dispatch, combine: separate.combine,
                                   step: try microseconds(0, 1), updateDispatch: fused?.call)
        samples.stepWithPhaseEvents = fused?.step ?? separate.step
        var valid = true
        for rank in 0..<r {
            if combines {
                try combined[rank].download(into: host[rank].combineTokens)
                valid = valid && data.validate(rank: rank, config: config, combined: host[rank].combineTokens)
            } else {
                try received[rank].download(into: host[rank].dispatchTokens)
                valid = valid && data.validateDispatch(rank: rank, config: config, received: host[rank].dispatchTokens)
            }
            if let fp8, let scales = receivedScales[rank], let hostScales = host[rank].dispatchScales {
                // Every receive slot's e4m3 codes and scale words: the quantisation of the plain row there.
                try received[rank].download(into: host[rank].dispatchTokens)
                try scales.download(into: hostScales)
                valid = valid && fp8.validate(rank: rank, config: config, received: host[rank].dispatchTokens, scales: hostScales)
            }
        }
        // The same calls replayed from CUDA graphs (after the check: they write the same rows).
        // Short calls take more of them per graph, so that the graph's own launch is a small share.
        let (calls, replays) = (samples.step.isEmpty ? 0 : PhaseStats(samples.step).median) < 200 ? (20, 10) : (5, 5)
        func graphed(_ call: () throws -> Void) throws -> Double { try timer.perCallInGraph(calls: calls, replays: replays, call) }
        var graphs = PhaseSamples.GraphTimes()
        graphs.update = try graphed { try group.update(topkIdx: idx.map(\.ref)) }
        graphs.dispatch = try graphed { try group.dispatch(dispatchIn, into: dispatchOut) }
        if combines { graphs.combine = try graphed { try group.combine(combineIn, into: combineOut) } }
        if let handle = fusedHandle {
            graphs.updateDispatch = try graphed { try group.dispatch(handle, topkIdx: idx.map(\.ref), dispatchIn, into: dispatchOut) }
            graphs.step = try graphed { try fusedStep(handle) }
        } else {
            graphs.step = try graphed { try separateStep() }
        }
        try group.checkStatus()
        // The device buffers must outlive every kernel that was enqueued on them.
        withExtendedLifetime((x, w, idx, received, receivedIdx, receivedWeights, combined, scalesIn, receivedScales, expertOutputs)) {}
        var measurement = Measurement(
            benchCase, config: config, backend: "gpu", device: device.name, samples: samples,
            bytes: StepBytes(config: config, routings: data.routings), copyBandwidth: copyBandwidth, validated: valid)
        measurement.setGraphTimes(graphs)
        measurement.hostPaced = !allHeld
        if !allHeld {
            FileHandle.standardError.write(Data("warning: \(benchCase.name): the host was still enqueueing when the stream's hold ended; its event times may be the host's pace\n".utf8))
        }
        measurement.tuning = TuningRecord(group.tuning, multiprocessors: group.multiprocessors, blocksPerRank: group.blocksPerRank)
        measurement.tuning?.combineBlocksPerRank = group.combineBlocksPerRank
        measurement.tuning?.fusedUpdate = group.fusesUpdate
        measurement.tuning?.dependentLaunches = group.overlapsLaunches
        return measurement
    }

    /// Device-to-device copy bandwidth, bytes read plus bytes written (GB/s), best of 10.
    func measureCopyBandwidth(bytes: Int = 1 << 30) throws -> Double {
        let driver = device.driver
        let a = try driver.allocate(byteCount: bytes), b = try driver.allocate(byteCount: bytes)
        defer { try? driver.free(a); try? driver.free(b) }
        // Initialised, so that compute-sanitizer's initcheck has nothing to report on the probe.
        try driver.fill(a, byte: 0, byteCount: bytes)
        let stream = try driver.createStream()
        defer { try? driver.destroy(stream) }
        let start = try driver.createEvent(), end = try driver.createEvent()
        defer { try? driver.destroy(start); try? driver.destroy(end) }
        var best = Double.infinity
        for _ in 0..<10 {
            try driver.record(start, on: stream)
            try driver.copy(from: a, to: b, byteCount: bytes, stream: stream)
            try driver.record(end, on: stream)
            try driver.synchronize(end)
            best = min(best, Double(try driver.elapsedMilliseconds(from: start, to: end)))
        }
        return Double(2 * bytes) / (best * 1e6)
    }
}

extension DeviceTensor {
    /// A device copy of `host` (same dtype and shape).
    convenience init(uploading host: HostTensor, on device: GPUDevice) throws {
        try self.init(host.dtype, host.shape, on: device)
        try upload(host)
    }
}

extension TuningRecord {
    init(_ tuning: GPUTuning, multiprocessors: Int, blocksPerRank: Int?) {
        self.init(
            multiprocessors: multiprocessors, blocksPerRank: blocksPerRank, pipelineDepth: tuning.pipelineDepth,
            rowsInFlight: tuning.rowsInFlight, rowPieces: tuning.rowPieces, blocksPerSM: tuning.blocksPerMultiprocessor,
            updateChunkTokens: tuning.updateChunkTokens, fullGrid: !tuning.fitsGridToWork)
    }
}
