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
        abstract: "Time update, dispatch and combine on the standard cases, validate the results, and print a table.",
        discussion: exitStatusText)

    @Option(name: .customLong("case"), help: "Case to run (repeatable): \(BenchCase.names.joined(separator: ", ")). Default: ll-std and ht-cpu on the CPU.")
    var cases: [String] = []

    @Option(help: "Backend: auto (GPU if one is found, else CPU), cpu, gpu.")
    var backend: BackendChoice = .auto

    @Option(help: "virtual: R ranks in this process; nccl: one process per GPU over NCCL (spawned, or under mpirun/torchrun).")
    var transport: TransportChoice = .virtual

    @Option(help: "Ranks of the group, 1...64 (overrides the case's R).")
    var ranks: Int?

    @Option(help: "Measured iterations, 1...100000 (default: 5 on the CPU, 100 on the GPU).")
    var iterations: Int?

    @Option(help: "Warm-up iterations, 0...10000 (the GPU runs at least 5).")
    var warmup: Int = 1

    @Option(help: "Routing skew: 0 is uniform; larger values (up to 100) concentrate traffic on low expert ids.")
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

    @Option(help: "NCCL: how ranks share buffers: windows (ncclMemAlloc + windows; peers' addresses from NCCL where it can say them, else descriptors passed over a Unix socket) or ipc (cuMemAlloc + CUDA IPC).")
    var sharing: PeerSharing = .ncclWindows

    @Option(help: "NCCL failure drill instead of the cases: never-joins (--drill-rank exits before joining) or dies (it exits after the group is built, before the first step). The others must report the failure within the timeout.")
    var drill: FailureDrill?

    @Option(help: "NCCL failure drill: the rank that fails.")
    var drillRank: Int = 1

    @Option(help: "Group timeout in milliseconds, 1...86400000: every cross-rank wait, and NCCL's join and handle exchange.")
    var timeoutMs: Int = 10_000

    @Option(help: "Write the results as JSON to this path (checked before the run: an existing file must be writable, a new one needs a writable folder).")
    var json: String?

    var names: [String] { cases.isEmpty ? ["ll-std", "ht-cpu"] : cases }

    /// The bounds of the numeric options, named in their errors. Large enough for any real run,
    /// small enough that no count derived from them (warm-up + iterations, events per iteration,
    /// milliseconds as a Duration) can overflow or exhaust memory before the run starts.
    enum Bounds {
        static let iterations = 1...100_000
        static let warmup = 0...10_000
        static let ranks = 1...GroupConfig.maxRanks
        static let skew = 0.0...100.0
        static let sms = 1...4_096
        static let pipelineDepth = 1...8
        static let rowsInFlight = 1...16
        static let rowPieces = 1...4_096
        static let blocksPerSM = 1...2
        /// One day, GroupConfig's longest timeout.
        static let timeoutMs = 1...86_400_000
    }

    func validate() throws {
        for name in cases where !BenchCase.names.contains(name) {
            throw ValidationError("unknown case '\(name)'; known cases: \(BenchCase.names.joined(separator: ", "))")
        }
        try check("--ranks", ranks, Bounds.ranks)
        if let ranks, let bad = BenchCase.standard.first(where: { names.contains($0.name) && $0.experts % ranks != 0 }) {
            throw ValidationError("--ranks \(ranks) does not divide the \(bad.experts) experts of case \(bad.name)")
        }
        try check("--iterations", iterations, Bounds.iterations)
        try check("--warmup", warmup, Bounds.warmup)
        guard skew.isFinite, Bounds.skew.contains(skew) else {
            throw ValidationError("--skew \(skew) is out of range: must be in \(Bounds.skew.lowerBound)...\(Bounds.skew.upperBound)")
        }
        try check("--sms", sms, Bounds.sms)
        try check("--pipeline-depth", pipelineDepth, Bounds.pipelineDepth)
        try check("--rows-in-flight", rowsInFlight, Bounds.rowsInFlight)
        try check("--row-pieces", rowPieces, Bounds.rowPieces)
        try check("--blocks-per-sm", blocksPerSM, Bounds.blocksPerSM)
        try check("--timeout-ms", timeoutMs, Bounds.timeoutMs)
        if drill != nil, transport != .nccl { throw ValidationError("--drill needs --transport nccl") }
        if drill != nil, !(0..<(ranks ?? 2)).contains(drillRank) {
            throw ValidationError("--drill-rank \(drillRank) is out of range: must be in 0..<\(ranks ?? 2) (the ranks)")
        }
        if let json { try Self.checkWritable(json: json) }
    }

    /// `--name value` must lie in `bounds` (nil: the option was not given).
    private func check(_ name: String, _ value: Int?, _ bounds: ClosedRange<Int>) throws {
        guard let value, !bounds.contains(value) else { return }
        throw ValidationError("\(name) \(value) is out of range: must be in \(bounds.lowerBound)...\(bounds.upperBound)")
    }

    /// `--json PATH` is checked before anything runs, without creating the file: an existing
    /// PATH must be a writable file; a new one needs an existing, writable folder.
    static func checkWritable(json path: String) throws {
        guard !path.isEmpty else { throw ValidationError("--json: the path is empty") }
        let files = FileManager.default
        var isFolder: ObjCBool = false
        if files.fileExists(atPath: path, isDirectory: &isFolder) {
            if isFolder.boolValue { throw ValidationError("--json \(path) is a folder, not a file") }
            guard access(path, W_OK) == 0 else {
                throw ValidationError("--json \(path): the file exists and is not writable (\(String(cString: strerror(errno))))")
            }
            return
        }
        let folder = URL(fileURLWithPath: path).deletingLastPathComponent().path
        guard files.fileExists(atPath: folder, isDirectory: &isFolder), isFolder.boolValue else {
            throw ValidationError("--json \(path): the folder \(folder) does not exist")
        }
        guard access(folder, W_OK | X_OK) == 0 else {
            throw ValidationError("--json \(path): the folder \(folder) is not writable (\(String(cString: strerror(errno))))")
        }
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
        try Self.requireValidated(results)
    }

    /// Exit status 1 when any case's results differ from the CPU oracle (the table says which).
    static func requireValidated(_ results: [Measurement]) throws {
        let failed = results.filter { !$0.validated }
        guard !failed.isEmpty else { return }
        let names = failed.map { result in result.rank.map { "\(result.name) (rank \($0))" } ?? result.name }
        FileHandle.standardError.write(Data("Error: results differ from the CPU oracle: \(names.joined(separator: ", "))\n".utf8))
        throw ExitCode.failure
    }

    /// The table, and the JSON file when asked for.
    func report(_ results: [Measurement]) throws {
        print(Table.render(results))
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            do {
                try encoder.encode(results).write(to: URL(fileURLWithPath: json))
            } catch {
                // Checked writable before the run; this is a disk that filled or a folder that went.
                throw RunFailure("--json \(json): could not write the results (\(error.localizedDescription))")
            }
            print("wrote \(json)")
        }
    }
}

/// A run that could not finish, or whose results failed: printed as `Error: <message>`, exit status 1
/// (a `ValidationError` means a bad command line: status 64).
struct RunFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

func format(_ value: Double, _ digits: Int) -> String { String(format: "%.\(digits)f", value) }
