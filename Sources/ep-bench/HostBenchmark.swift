import ExpertParallel
import Foundation

/// Runs a case on the host backend: every rank on its own thread, timed per call.
struct HostBenchmark {
    var iterations: Int
    var warmup: Int
    var seed: UInt64
    var skew: Double

    func run(_ benchCase: BenchCase, copyBandwidth: Double) throws -> Measurement {
        let config = try benchCase.config().validated()
        let group = try HostGroup(config)
        let data = try BenchData(config: config, tokens: benchCase.tokens, seed: seed, skew: skew)
        let iterations = self.iterations, warmup = self.warmup
        let combines = config.elementType.isFloating
        // FP8: the oracle's plain dispatch of the same step, and pass-through's e4m3 inputs (untimed).
        let fp8 = try config.fp8.map { _ in try FP8HostData(config: config, data: data) }
        let results = group.run { rank throws(EPError) -> [[Double]] in
            let r = rank.rank
            let handle = try rank.makeHandle()
            let outputs = try data.outputs(for: config)
            var samples: [[Double]] = []
            for i in 0..<(warmup + iterations) {
                let t0 = ContinuousClock.now
                try rank.update(handle, topkIdx: data.topkIdx[r].ref)
                let t1 = ContinuousClock.now
                _ = try rank.dispatch(handle, fp8?.dispatchInput(r, data) ?? data.dispatchInput(r), into: outputs.dispatch, direction: .forward)
                let t2 = ContinuousClock.now
                if combines {
                    let input = fp8?.combineInput(r, outputs, config, data) ?? data.combineInput(r, outputs, config)
                    try rank.combine(handle, input, into: outputs.combine, direction: .forward)
                }
                let t3 = ContinuousClock.now
                // The step is read once around the whole sequence, not added up from the phases.
                if i >= warmup { samples.append([t1 - t0, t2 - t1, t3 - t2, t3 - t0].map(\.microseconds)) }
            }
            let valid = combines
                ? data.validate(rank: r, config: config, combined: outputs.combineTokens)
                : data.validateDispatch(rank: r, config: config, received: outputs.dispatchTokens)
            guard valid else {
                throw .backend("rank \(r): \(combines ? "combined rows differ from Σ_k w_k·x beyond rounding" : "received rows differ from the rows sent to it")")
            }
            if let fp8, !fp8.validate(rank: r, config: config, received: outputs.dispatchTokens, scales: outputs.dispatchScales!) {
                throw .backend("rank \(r): received FP8 rows or scales differ from the quantisation of the rows a plain dispatch delivers")
            }
            return samples
        }
        var perRank: [[[Double]]] = []
        for result in results { perRank.append(try result.get()) }
        // A phase ends when its slowest rank ends: take the maximum over ranks per iteration.
        func phase(_ p: Int) -> [Double] {
            (0..<iterations).map { i in perRank.map { $0[i][p] }.max() ?? 0 }
        }
        let samples = PhaseSamples(update: phase(0), dispatch: phase(1), combine: combines ? phase(2) : nil, step: phase(3))
        return Measurement(
            benchCase, config: config, backend: "cpu", device: Self.deviceName, samples: samples,
            bytes: StepBytes(config: config, routings: data.routings), copyBandwidth: copyBandwidth, validated: true)
    }

    static var deviceName: String { "CPU (\(ProcessInfo.processInfo.activeProcessorCount) cores)" }

    /// memcpy bandwidth of this machine, counting bytes read plus bytes written (GB/s).
    static func measureCopyBandwidth(bytes: Int = 128 << 20) -> Double {
        let source = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        let target = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        defer { source.deallocate(); target.deallocate() }
        source.initializeMemory(as: UInt8.self, repeating: 1, count: bytes)
        target.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        var best = Double.infinity
        for _ in 0..<5 {
            let start = ContinuousClock.now
            memcpy(target, source, bytes)
            best = min(best, (ContinuousClock.now - start).microseconds)
        }
        return Double(2 * bytes) / (best * 1e3)
    }
}

extension Duration {
    var microseconds: Double {
        let (s, atto) = components
        return Double(s) * 1e6 + Double(atto) * 1e-12
    }
}
