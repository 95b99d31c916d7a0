import ArgumentParser
import ExpertParallel
import ExpertParallelGPU
import Foundation

enum BackendChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, cpu, gpu
}

enum TransportChoice: String, ExpressibleByArgument, CaseIterable {
    /// R virtual ranks on one GPU (or the CPU).
    case virtual
    /// One process per GPU joined by NCCL: spawned here, or started by mpirun / torchrun.
    case nccl
}

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Time update, dispatch and combine on the standard cases, validate the results, and print a table.")

    @Option(name: .customLong("case"), help: "Case to run (repeatable): \(BenchCase.names.joined(separator: ", ")). Default: ll-std and ht-cpu on the CPU.")
    var cases: [String] = []

    @Option(help: "Backend: auto (GPU if one is found, else CPU), cpu, gpu.")
    var backend: BackendChoice = .auto

    @Option(help: "virtual: R ranks in this process; nccl: one process per GPU over NCCL (spawned, or under mpirun/torchrun).")
    var transport: TransportChoice = .virtual

    @Option(help: "Ranks of the group (overrides the case's R).")
    var ranks: Int?

    @Option(help: "Measured iterations (default: 5 on the CPU, 100 on the GPU).")
    var iterations: Int?

    @Option(help: "Warm-up iterations.")
    var warmup: Int = 1

    @Option(help: "Routing skew: 0 is uniform; larger values concentrate traffic on low expert ids.")
    var skew: Double = 0

    @Option(help: "Seed of the routing and payload.")
    var seed: UInt64 = 1

    @Option(help: "GPU: streaming multiprocessors the group may use (default: all).")
    var sms: Int?

    @Option(help: "GPU: dispatch pipeline depth, vectors each lane loads before storing (1...8).")
    var pipelineDepth: Int = 4

    @Option(help: "GPU: combine rows loaded before the first is used (1...16).")
    var rowsInFlight: Int = 8

    @Option(help: "GPU: pieces each token row is cut into, one warp each (default: automatic).")
    var rowPieces: Int?

    @Option(name: .customLong("blocks-per-sm"), help: "GPU: 512-thread blocks per SM in one launch (1 or 2; default 2, 1 for R = 1).")
    var blocksPerSM: Int?

    @Option(help: "NCCL: how ranks share buffers: windows (ncclMemAlloc + windows, descriptors taken with pidfd_getfd) or ipc (cuMemAlloc + CUDA IPC).")
    var sharing: PeerSharing = .ncclWindows

    @Option(help: "NCCL failure drill instead of the cases: never-joins (--drill-rank exits before joining) or dies (it exits after the group is built, before the first step). The others must report the failure within the timeout.")
    var drill: FailureDrill?

    @Option(help: "NCCL failure drill: the rank that fails.")
    var drillRank: Int = 1

    @Option(help: "Group timeout in milliseconds: every cross-rank wait, and NCCL's join and handle exchange.")
    var timeoutMs: Int = 10_000

    @Option(help: "Write the results as JSON to this path.")
    var json: String?

    var names: [String] { cases.isEmpty ? ["ll-std", "ht-cpu"] : cases }

    func validate() throws {
        for name in cases where !BenchCase.names.contains(name) {
            throw ValidationError("unknown case '\(name)'; known cases: \(BenchCase.names.joined(separator: ", "))")
        }
        if let ranks, ranks < 1 { throw ValidationError("--ranks must be ≥ 1, got \(ranks)") }
        if let ranks, let bad = BenchCase.standard.first(where: { names.contains($0.name) && $0.experts % ranks != 0 }) {
            throw ValidationError("--ranks \(ranks) does not divide the \(bad.experts) experts of case \(bad.name)")
        }
        if let iterations, iterations < 1 { throw ValidationError("--iterations must be ≥ 1, got \(iterations)") }
        if timeoutMs < 1 { throw ValidationError("--timeout-ms must be ≥ 1, got \(timeoutMs)") }
        if drill != nil, transport != .nccl { throw ValidationError("--drill needs --transport nccl") }
        if drill != nil, !(0..<(ranks ?? 2)).contains(drillRank) {
            throw ValidationError("--drill-rank \(drillRank) is not a rank of the \(ranks ?? 2) ranks")
        }
        if skew < 0 { throw ValidationError("--skew must be ≥ 0, got \(skew)") }
    }

    func run() throws {
        if transport == .nccl { return try runNCCL() }
        var device: GPUDevice?
        if backend != .cpu {
            do { device = try GPUDevice() } catch {
                if backend == .gpu { throw error }
                FileHandle.standardError.write(Data("no GPU (\(error)); using the CPU backend\n".utf8))
            }
        }
        let onGPU = device != nil
        let names = cases.isEmpty ? (onGPU ? ["ll-std", "ll-32", "ll-1", "odd"] : ["ll-std", "ht-cpu"]) : cases
        var selected = BenchCase.standard.filter { names.contains($0.name) }
        if let ranks { selected = selected.map { $0.with(ranks: ranks) } }
        var results: [Measurement] = []
        if let device {
            let tuning = GPUTuning(pipelineDepth: pipelineDepth, rowsInFlight: rowsInFlight, rowPieces: rowPieces, blocksPerMultiprocessor: blocksPerSM)
            let runner = GPUBenchmark(device: device, iterations: iterations ?? 100, warmup: max(warmup, 5), seed: seed, skew: skew,
                                      multiprocessors: sms, tuning: tuning)
            let copyBandwidth = try runner.measureCopyBandwidth()
            print("backend gpu: \(device.name), \(device.multiprocessors) SMs; device copy bandwidth \(format(copyBandwidth, 1)) GB/s (read + write)")
            for benchCase in selected {
                FileHandle.standardError.write(Data("running \(benchCase.label) on the GPU...\n".utf8))
                results.append(try runner.run(benchCase, copyBandwidth: copyBandwidth))
            }
        } else {
            let copyBandwidth = HostBenchmark.measureCopyBandwidth()
            print("backend cpu: memcpy bandwidth \(format(copyBandwidth, 1)) GB/s (read + write)")
            let runner = HostBenchmark(iterations: iterations ?? 5, warmup: warmup, seed: seed, skew: skew)
            for benchCase in selected {
                FileHandle.standardError.write(Data("running \(benchCase.label) on the CPU...\n".utf8))
                results.append(try runner.run(benchCase, copyBandwidth: copyBandwidth))
            }
        }
        try report(results)
    }

    /// The table, and the JSON file when asked for.
    func report(_ results: [Measurement]) throws {
        print(Table.render(results))
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try encoder.encode(results).write(to: URL(fileURLWithPath: json))
            print("wrote \(json)")
        }
    }
}

func format(_ value: Double, _ digits: Int) -> String { String(format: "%.\(digits)f", value) }
