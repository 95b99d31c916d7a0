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
        abstract: "Time update, dispatch, combine and the whole step on the standard cases, validate the results, and print a table.",
        discussion: exitStatusText)

    @OptionGroup(title: "Cases")
    var shape: CaseOptions

    @Option(help: "Backend: auto (GPU if one is found, else CPU), cpu, gpu.")
    var backend: BackendChoice = .auto

    @Option(help: "virtual: R ranks in this process; nccl: one process per GPU over NCCL (spawned, or under mpirun/torchrun).")
    var transport: TransportChoice = .virtual

    @Option(parsing: .unconditional, help: "Measured iterations, 1...100000 (default: 5 on the CPU, 100 on the GPU).", transform: NumberArgument.whole(Bounds.iterations))
    var iterations: Int?

    // Options with a default keep what was given apart (`given...`; a choice's `Defaulted`), so
    // that an option a run would ignore is refused only when it was given (RunCommand+Applicable.swift).

    @Option(name: .customLong("warmup"), parsing: .unconditional, help: ArgumentHelp("Warm-up iterations, 0...10000 (the GPU runs at least 5). (default: 1)", valueName: "warmup"), transform: NumberArgument.whole(Bounds.warmup))
    var givenWarmup: Int?
    var warmup: Int { givenWarmup ?? 1 }

    @Option(name: .customLong("skew"), parsing: .unconditional, help: ArgumentHelp("Routing skew: 0 is uniform; larger values (up to 100) concentrate traffic on low expert ids. (default: 0.0)", valueName: "skew"), transform: NumberArgument.real(Bounds.skew))
    var givenSkew: Double?
    var skew: Double { givenSkew ?? 0 }

    @Option(name: .customLong("seed"), parsing: .unconditional, help: ArgumentHelp("Seed of the routing and payload. (default: 1)", valueName: "seed"), transform: NumberArgument.unsigned)
    var givenSeed: UInt64?
    var seed: UInt64 { givenSeed ?? 1 }

    @Flag(help: "Print a progress line per run on stderr even when stderr is not a terminal (on a terminal it always shows).")
    var progress = false

    @OptionGroup(title: "GPU")
    var gpu: GPUOptions

    @Option(name: .customLong("sharing"), help: ArgumentHelp("NCCL: how ranks share buffers: windows (ncclMemAlloc + windows; peers' addresses from NCCL where it can say them, else descriptors passed over a Unix socket) or ipc (cuMemAlloc + CUDA IPC).", valueName: "sharing"))
    var sharingOption = Defaulted(PeerSharing.ncclWindows)
    var sharing: PeerSharing { sharingOption.value }
    var givenSharing: PeerSharing? { sharingOption.given }

    @Option(help: "NCCL failure drill instead of the cases: never-joins (--drill-rank exits before joining) or dies (it exits after the group is built, before the first step). The others must report the failure within the timeout.")
    var drill: FailureDrill?

    @Option(name: .customLong("drill-rank"), parsing: .unconditional, help: ArgumentHelp("NCCL failure drill: the rank that fails, 0..<the ranks. (default: 1)", valueName: "drill-rank"), transform: NumberArgument.whole(bound: "in 0..<the ranks"))
    var givenDrillRank: Int?
    var drillRank: Int { givenDrillRank ?? 1 }

    @Option(name: .customLong("timeout-ms"), parsing: .unconditional, help: ArgumentHelp("NCCL: group timeout in milliseconds, 1...86400000: every cross-rank wait, and NCCL's join and handle exchange. (default: 10000)", valueName: "timeout-ms"), transform: NumberArgument.whole(Bounds.timeoutMs))
    var givenTimeoutMs: Int?
    var timeoutMs: Int { givenTimeoutMs ?? 10_000 }

    @Option(help: "Write the results as JSON to this path: a list with one entry per case (and SM count), each with its phases, floors, tuning and the run's record (commit, device, versions, seed, options). Checked before the run: an existing path must be a regular file this process can write, /dev/null, or a pipe or terminal it holds open (/dev/stdout), a new one needs a writable folder.")
    var json: String?

    @Option(help: "Write an SVG plot to this path: per-rank GB/s of dispatch and combine against tokens per rank, one point per case (and --tokens or --sms count), with the floor's GB/s dashed (ep-bench plot draws it from a --json file). Checked before the run like --json.")
    var plot: String?

    /// The cases each backend runs when none is named.
    enum Defaults {
        static let cpu = ["ll-std", "ht-cpu"]
        static let gpu = ["ll-std", "ll-32", "ll-1", "odd"]
        static let nccl = ["ll-std", "ll-32", "ll-1", "ht-std"]
    }

    /// The bounds of the run's numeric options, named in their errors. Large enough for any real
    /// run, small enough that no count derived from them (warm-up + iterations, events per
    /// iteration, milliseconds as a Duration) can overflow or exhaust memory before the run starts.
    /// The case and GPU options have theirs in `CaseOptions.Bounds` and `GPUOptions.Bounds`.
    enum Bounds {
        static let iterations = 1...100_000
        static let warmup = 0...10_000
        static let skew = 0.0...100.0
        /// One day, GroupConfig's longest timeout.
        static let timeoutMs = 1...86_400_000
    }

    func validate() throws {
        let cases = drill == nil ? try shape.resolve(defaults: transport == .nccl ? Defaults.nccl : backend == .gpu ? Defaults.gpu : Defaults.cpu) : nil
        try checkRange("--iterations", iterations, Bounds.iterations)
        try checkRange("--warmup", warmup, Bounds.warmup)
        guard skew.isFinite, Bounds.skew.contains(skew) else {
            throw ValidationError("--skew \(skew) is out of range: must be in \(Bounds.skew.lowerBound)...\(Bounds.skew.upperBound)")
        }
        try checkRange("--timeout-ms", timeoutMs, Bounds.timeoutMs)
        if transport == .nccl, backend == .cpu {
            throw ValidationError("--transport nccl runs one process per GPU: it does not run with --backend cpu (use --backend gpu or auto)")
        }
        if shape.dtype == .u8, transport == .nccl {
            throw ValidationError("--dtype u8 is dispatch only; --transport nccl times the whole step: use bf16, f16 or f32")
        }
        try checkOptionsApply(cases: backend == .gpu || transport == .nccl ? cases : nil)
        if drill != nil { try checkDrillRanks() }
        if drill != nil, !(0..<(shape.ranks ?? 2)).contains(drillRank) {
            throw ValidationError("--drill-rank \(drillRank) is out of range: must be in 0..<\(shape.ranks ?? 2) (the ranks)")
        }
        if let json { try OutputPath.check(json, option: "--json") }
        if let plot { try OutputPath.check(plot, option: "--plot") }
        if let json, let plot, sameFile(json, plot) {
            throw ValidationError("--plot \(plot) is the --json file \(json): the plot would overwrite the results; give them different paths")
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
        if let device { try runOnGPU(device) } else { try runOnCPU() }
    }
}

/// A run that could not finish, or whose results failed: printed as `Error: <message>`, exit status 1
/// (a `ValidationError` means a bad command line: status 64).
struct RunFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

func format(_ value: Double, _ digits: Int) -> String { String(format: "%.\(digits)f", value) }
