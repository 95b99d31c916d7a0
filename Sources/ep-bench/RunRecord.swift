/// What a result file needs to be read later: the build, the machine, the seed and every option.
/// Each entry of `--json`'s list carries it as `run` (the file stays a list of measurements, the
/// shape python/expert_parallel/bench.py reads).
struct RunRecord: Codable, Sendable {
    var version: String
    /// null when unknown (SourceCommit says how it is found).
    @AlwaysEncoded var commit: String?
    @AlwaysEncoded var commitModified: Bool?
    @AlwaysEncoded var commitSource: String?
    var backend: String
    var transport: String
    var device: String
    /// CUDA driver, NVRTC and NCCL versions ("12.8"); null where the run did not use them.
    @AlwaysEncoded var driverVersion: String?
    @AlwaysEncoded var nvrtcVersion: String?
    @AlwaysEncoded var ncclVersion: String?
    /// `EP_KERNEL_DEFINES` as the step kernels took it (switches sorted by name); null: the
    /// default kernels (or a run without GPU kernels).
    @AlwaysEncoded var kernelDefines: String?
    @AlwaysEncoded var copyBandwidthGBs: Double?
    var seed: UInt64
    /// Iterations and warm-up as run (the backend's defaults and minimums applied).
    var iterations: Int
    var warmup: Int
    /// The GPU tuning asked for (each result's `tuning` is what its group ran with).
    var tuning: TuningOptions
    var options: OptionsRecord
    /// The command line after the program name.
    var arguments: [String]
}

/// The GPU knobs as given on the command line (null: automatic; sms empty: every SM).
struct TuningOptions: Codable, Sendable {
    var sms: [Int]
    var pipelineDepth: Int
    var rowsInFlight: Int
    @AlwaysEncoded var rowPieces: Int?
    @AlwaysEncoded var blocksPerSM: Int?
    var updateChunkTokens: Int
    var fullGrid: Bool
    var serialLaunches: Bool
    /// --fused-update / --no-fused-update; null: automatic.
    @AlwaysEncoded var fusedUpdate: Bool? = nil
}

/// Every option of `ep-bench run` as given (null: not given, the case's or the default value).
struct OptionsRecord: Codable, Sendable {
    var cases: [String]
    var backend: String
    var transport: String
    @AlwaysEncoded var ranks: Int?
    /// The only `--tokens` given (null: none, or several: `tokenCounts` has them all).
    @AlwaysEncoded var tokens: Int?
    var tokenCounts: [Int]
    /// `--max-tokens`; absent (not null) where not given, so that a run without it writes what it wrote before.
    var maxTokens: Int? = nil
    @AlwaysEncoded var hidden: Int?
    @AlwaysEncoded var topK: Int?
    @AlwaysEncoded var experts: Int?
    @AlwaysEncoded var layout: String?
    @AlwaysEncoded var alignment: Int?
    var dtype: String
    @AlwaysEncoded var fp8: String?
    @AlwaysEncoded var fp8Source: String?
    @AlwaysEncoded var iterations: Int?
    var warmup: Int
    var skew: Double
    var seed: UInt64
    var sms: [Int]
    var pipelineDepth: Int
    var rowsInFlight: Int
    @AlwaysEncoded var rowPieces: Int?
    @AlwaysEncoded var blocksPerSM: Int?
    var updateChunkTokens: Int
    var fullGrid: Bool
    var serialLaunches: Bool
    @AlwaysEncoded var fusedUpdate: Bool?
    var sharing: String
    @AlwaysEncoded var drill: String?
    var drillRank: Int
    var timeoutMs: Int
    var progress: Bool
    @AlwaysEncoded var json: String?
    @AlwaysEncoded var plot: String?
}
