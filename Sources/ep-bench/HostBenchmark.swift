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
        let data = BenchData(config: config, tokens: benchCase.tokens, seed: seed, skew: skew)
        let iterations = self.iterations, warmup = self.warmup
        let results = group.run { rank throws(EPError) -> [[Double]] in
            let r = rank.rank
            let handle = try rank.makeHandle()
            let outputs = data.outputs(for: config)
            var samples: [[Double]] = []
            for i in 0..<(warmup + iterations) {
                let t0 = ContinuousClock.now
                try rank.update(handle, topkIdx: data.topkIdx[r].ref)
                let t1 = ContinuousClock.now
                _ = try rank.dispatch(handle, data.dispatchInput(r), into: outputs.dispatch, direction: .forward)
                let t2 = ContinuousClock.now
                try rank.combine(handle, data.combineInput(r, outputs, config), into: outputs.combine, direction: .forward)
                let t3 = ContinuousClock.now
                if i >= warmup { samples.append([t1 - t0, t2 - t1, t3 - t2].map(\.microseconds)) }
            }
            guard data.validate(rank: r, config: config, combined: outputs.combineTokens) else {
                throw .backend("rank \(r): combined rows differ from Σ_k w_k·x beyond bf16 tolerance")
            }
            return samples
        }
        var perRank: [[[Double]]] = []
        for result in results { perRank.append(try result.get()) }
        // A phase ends when its slowest rank ends: take the maximum over ranks per iteration.
        func phase(_ p: Int) -> PhaseStats {
            PhaseStats((0..<iterations).map { i in perRank.map { $0[i][p] }.max() ?? 0 })
        }
        let bytes = StepBytes(config: config, routings: data.routings)
        return Measurement(
            name: benchCase.name, backend: "cpu", device: "CPU (\(ProcessInfo.processInfo.activeProcessorCount) cores)",
            algorithm: config.algorithm.rawValue, layout: "\(config.layout)", ranks: config.ranks,
            tokens: benchCase.tokens, hidden: config.hidden, topK: config.topK, experts: config.experts,
            iterations: iterations, update: phase(0), dispatch: phase(1), combine: phase(2),
            bytesPerRank: Double(bytes.countedRowsPerRank.reduce(0, +) * bytes.rowBytes) / Double(config.ranks),
            floorBytes: Double(bytes.floorBytes), copyBandwidthGBs: copyBandwidth, validated: true)
    }

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
