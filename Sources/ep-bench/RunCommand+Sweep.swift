import ArgumentParser
import ExpertParallel
import ExpertParallelGPU
import Foundation

extension RunCommand {
    /// Every case on the host backend. The GPU's options are refused here when `--backend auto`
    /// found no GPU, as `validate()` refuses them with `--backend cpu`: an `--sms` sweep or a
    /// tuning that cannot happen is a usage error, not a silent run without it.
    func runOnCPU() throws {
        if backend != .cpu { try refuseGPUOptions(on: "the CPU backend (--backend auto found no GPU)") }
        let selected = try shape.resolve(defaults: Defaults.cpu)
        let copyBandwidth = HostBenchmark.measureCopyBandwidth()
        print("backend cpu: memcpy bandwidth \(format(copyBandwidth, 1)) GB/s (read + write)")
        let runner = HostBenchmark(iterations: iterations ?? 5, warmup: warmup, seed: seed, skew: skew)
        var progress = Progress(total: selected.count, forced: self.progress)
        var results: [Measurement] = []
        for benchCase in selected {
            progress.start(benchCase.label)
            results.append(try runner.run(benchCase, copyBandwidth: copyBandwidth))
        }
        progress.finish()
        let record = runRecord(backend: "cpu", device: HostBenchmark.deviceName, facts: DeviceFacts(),
                               copyBandwidth: copyBandwidth, iterations: runner.iterations, warmup: runner.warmup)
        try report(results, record)
        try Self.requireValidated(results)
    }

    /// Every case on one GPU, once per `--sms` count (or once with every SM).
    func runOnGPU(_ device: GPUDevice) throws {
        let selected = try shape.resolve(defaults: Defaults.gpu)
        try checkAlgorithmOptions(selected)   // --backend auto's cases: known only now
        try shape.checkForGPU(selected)
        try shape.checkTuning(gpu.tuning, selected)
        try gpu.check(device: device.multiprocessors)
        var runner = GPUBenchmark(device: device, iterations: iterations ?? 100, warmup: max(warmup, 5), seed: seed, skew: skew,
                                  multiprocessors: nil, tuning: gpu.tuning)
        let copyBandwidth = try runner.measureCopyBandwidth()
        print("backend gpu: \(device.name), \(device.multiprocessors) SMs; device copy bandwidth \(format(copyBandwidth, 1)) GB/s (read + write)"
              + (KernelVariant.defines.map { "; kernel variant \($0)" } ?? ""))
        let counts: [Int?] = gpu.smCounts.isEmpty ? [nil] : gpu.smCounts
        var progress = Progress(total: selected.count * counts.count, forced: self.progress)
        var results: [Measurement] = []
        for benchCase in selected {
            for sms in counts {
                progress.start("\(benchCase.label) sms=\(sms ?? device.multiprocessors)")
                runner.multiprocessors = sms
                results.append(try runner.run(benchCase, copyBandwidth: copyBandwidth))
            }
        }
        progress.finish()
        let record = runRecord(backend: "gpu", device: device.name, facts: DeviceFacts(driver: device.driver),
                               copyBandwidth: copyBandwidth, iterations: runner.iterations, warmup: runner.warmup)
        try report(results, record)
        try Self.requireValidated(results)
    }
}
