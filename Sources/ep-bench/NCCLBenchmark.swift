import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Foundation

/// Runs a case as one NCCL rank (this process, one GPU): the same inputs as every other rank
/// generates from the seed, timed with CUDA events per call, validated bit for bit against the
/// CPU oracle run here for all ranks.
struct NCCLBenchmark {
    var device: GPUDevice
    var nccl: NCCLLibrary
    var comm: NCCLComm
    var rank: Int
    var iterations: Int
    var warmup: Int
    var seed: UInt64
    var skew: Double
    var tuning: GPUTuning
    var sharing: PeerSharing
    var timeout: Duration
    /// The SMs each rank's group may use (nil: all).
    var multiprocessors: Int? = nil

    func run(_ benchCase: BenchCase, copyBandwidth: Double) throws -> Measurement {
        var config = benchCase.config()
        config.timeout = timeout
        config = try config.validated()
        let group = try NCCLRankGroup(config, device: device, comm: comm, nccl: nccl, multiprocessors: multiprocessors, tuning: tuning,
                                      sharing: sharing)
        let data = try BenchData(config: config, tokens: benchCase.tokens, seed: seed, skew: skew)
        let step = try NCCLStep(group: group, data: data, rank: rank)
        let oracle = try data.oracleCombined(config: config)   // before the loops: none of them waits for the host
        // The one-call loop's own step (the next seed): a fused dispatch that moved nothing would
        // leave the first loop's rows, which then combine to the first oracle, not this one.
        var fused: (data: BenchData, step: NCCLStep, oracle: [[UInt8]])?
        if group.fusesUpdate {
            let data = try BenchData(config: config, tokens: benchCase.tokens, seed: seed &+ 1, skew: skew)
            fused = (data, try NCCLStep(group: group, data: data, rank: rank), try data.oracleCombined(config: config))
        }
        let driver = device.driver
        let total = warmup + iterations
        let events = try (0..<(5 * total)).map { _ in try driver.createEvent() }
        defer { for e in events { try? driver.destroy(e) } }
        // Every iteration enqueued behind a hold of the stream, so the events time the GPU, not
        // the host (as for virtual ranks; ll-1's kernels are shorter than a call's host time).
        // One hold of 100 ms a batch and no second run: the peers run the same calls in their own
        // processes, and a rank that ran a batch again alone would leave them waiting; the hold
        // leaves room for the host's enqueueing and for the ranks' holds, which start apart by
        // their processes' skew, to overlap.
        let timer = StreamTimer(device: device, stream: group.stream)
        func held(_ enqueue: (Int) throws -> Void) throws -> Bool {
            try timer.held(total, hold: 100_000_000, runs: 1, first: { events[5 * $0] }, enqueue)
        }
        // One untimed step of each loop first (every rank's): its kernels compile (NVRTC, most of
        // a second) before any hold, which they would outlast.
        try step.enqueue()
        try fused?.step.enqueueUpdatingInDispatch()
        try driver.synchronize(group.stream)
        // FP8: each loop's received rows are checked slot by slot after it, so none may be left
        // from the other loop's step. (No peer writes here before this rank's next update: its
        // dispatch waits for this rank's counts, which come after the clear on this stream.)
        if config.fp8 != nil { try step.clearReceived() }
        var allHeld = try held { i in
            try step.enqueue { try driver.record(events[5 * i + $0], on: group.stream) }
        }
        try group.checkStatus()
        func microseconds(_ from: Int, _ to: Int) throws -> [Double] {
            try (warmup..<total).map { i in Double(try driver.elapsedMilliseconds(from: events[5 * i + from], to: events[5 * i + to])) * 1000 }
        }
        // The step leaves out the copy of the received rows into the expert-output buffer (marks
        // 2 to 3, the experts' stand-in): per iteration, the sequence before it plus combine.
        let beforeCopy = try microseconds(0, 2), combine = try microseconds(3, 4)
        var samples = PhaseSamples(
            update: try microseconds(0, 1), dispatch: try microseconds(1, 2), combine: combine,
            step: zip(beforeCopy, combine).map { $0 + $1 })
        func matches(_ step: NCCLStep, _ data: BenchData, _ oracle: [[UInt8]]) throws -> Bool {
            let combinedHost = try step.combinedRows()
            return combinedHost.bytes() == oracle[rank] && data.validate(rank: rank, config: config, combined: combinedHost)
        }
        var valid = try matches(step, data, oracle) && step.receivedFP8Matches(rank: rank)
        // Where the group fuses them (LL: one rank, or --fused-update), update and dispatch again
        // as one call (the stacked dispatch, what the Python package calls), on a step of its
        // own: the `upd+disp` row, its results checked against that step's oracle.
        if let fused {
            if config.fp8 != nil { try fused.step.clearReceived() }
            allHeld = try held { i in
                try fused.step.enqueueUpdatingInDispatch { try driver.record(events[5 * i + $0], on: group.stream) }
            } && allHeld
            try group.checkStatus()
            samples.updateDispatch = try microseconds(0, 2)
            samples.step = zip(samples.updateDispatch ?? [], try microseconds(3, 4)).map { $0 + $1 }   // as the virtual groups' step: that call + combine
            valid = try matches(fused.step, fused.data, fused.oracle) && fused.step.receivedFP8Matches(rank: rank) && valid
        }
        var measurement = Measurement(
            benchCase, config: config, backend: "gpu-nccl-\(sharing.rawValue)", device: device.name, samples: samples,
            bytes: StepBytes(config: config, routings: data.routings), copyBandwidth: copyBandwidth, validated: valid,
            rank: rank, stepNote: Self.stepNote)
        measurement.tuning = TuningRecord(group.tuning, multiprocessors: group.multiprocessors, blocksPerRank: nil)
        measurement.tuning?.dependentLaunches = group.overlapsLaunches
        measurement.tuning?.fusedUpdate = group.fusesUpdate
        measurement.hostPaced = !allHeld
        if !allHeld {
            FileHandle.standardError.write(Data("warning: \(benchCase.name) rank \(rank): the host was still enqueueing when the stream's hold ended; its event times may be the host's pace\n".utf8))
        }
        return measurement
    }

    static let stepNote = "per iteration: update + dispatch, then combine; the copy of the received rows to the expert outputs between them is left out"
}

extension BenchData {
    /// Every rank's combined rows from the host backend with identity experts (the oracle).
    /// `without`: ranks masked out first (a rank that died); their entries are empty. An FP8
    /// step's combine reads the rows a plain dispatch delivers (`NCCLStep.expertRows`), so its
    /// oracle is the plain step's.
    func oracleCombined(config given: GroupConfig, without: [Int] = []) throws -> [[UInt8]] {
        var plain = given
        plain.fp8 = nil
        let config = plain
        let group = try HostGroup(config)
        for r in without { try group[0].deactivate(rank: r) }
        let results = group.run { rank throws(EPError) -> [UInt8] in
            if without.contains(rank.rank) { return [] }
            let outputs = try self.outputs(for: config)
            let handle = try rank.makeHandle()
            try rank.update(handle, topkIdx: self.topkIdx[rank.rank].ref)
            _ = try rank.dispatch(handle, self.dispatchInput(rank.rank), into: outputs.dispatch, direction: .forward)
            try rank.combine(handle, self.combineInput(rank.rank, outputs, config), into: outputs.combine, direction: .forward)
            return outputs.combineTokens.bytes()
        }
        return try results.map { try $0.get() }
    }
}
