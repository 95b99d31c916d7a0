import ExpertParallel

/// Timings of one phase over the measured iterations, in microseconds, and (every phase but the
/// update) the bytes the standard counting takes for it, its floor and how far the median is from
/// them.
struct PhaseStats: Codable, Sendable {
    var minimum: Double
    var median: Double
    var maximum: Double
    /// Bytes per rank as the standard counting takes them (the step: dispatch's plus combine's).
    var bytesPerRank: Double?
    /// Bytes the phase must read plus write (the step: the dispatch floor plus the combine floor),
    /// and their time at the copy bandwidth measured in the same run.
    var floorBytes: Double?
    var floorMicroseconds: Double?
    var percentOfFloor: Double?
    var gbPerSecond: Double?
    /// How the phase was measured, where that is not one reading around the calls themselves.
    var note: String?
    /// GPU, virtual ranks: µs per call with the phase's calls captured in one CUDA graph and
    /// replayed, no event between them (StreamTimer.perCallInGraph); null elsewhere.
    var graphMicroseconds: Double?

    init(_ samples: [Double]) {
        let sorted = samples.sorted()
        minimum = sorted.first ?? 0
        maximum = sorted.last ?? 0
        median = sorted.isEmpty ? 0 : sorted.count % 2 == 1
            ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
    }

    init(_ samples: [Double], bytesPerRank: Double, floorBytes: Double, copyBandwidthGBs: Double, note: String? = nil) {
        self.init(samples)
        self.bytesPerRank = bytesPerRank
        self.floorBytes = floorBytes
        let floor = floorBytes / (copyBandwidthGBs * 1e3)
        floorMicroseconds = floor
        percentOfFloor = median > 0 ? 100 * floor / median : 0
        gbPerSecond = median > 0 ? bytesPerRank / (median * 1e3) : 0
        self.note = note
    }
}

/// Per-iteration samples of each phase (µs). `combine` is nil where the element type has no
/// combine (u8); `step` is update + dispatch + combine read as one sequence per iteration.
struct PhaseSamples {
    var update: [Double] = []
    var dispatch: [Double] = []
    var combine: [Double]?
    var step: [Double] = []
    /// Update and dispatch as one call (LL on the GPU: one fused launch), where the group fuses
    /// them; `step` is then that call + combine.
    var updateDispatch: [Double]?
    /// GPU, virtual ranks: the step as read in the phases' loops, with an event between its calls
    /// (`step` is read in a loop of its own, events only around it); nil elsewhere.
    var stepWithPhaseEvents: [Double]?

    /// Per call of each phase, replayed from a CUDA graph (µs).
    struct GraphTimes {
        var update: Double?
        var dispatch: Double?
        var updateDispatch: Double?
        var combine: Double?
        var step: Double?
    }
}

/// One case's result, as printed and as written by `--json`.
struct Measurement: Codable, Sendable {
    var name: String
    var backend: String
    var device: String
    var algorithm: String
    var layout: String
    /// The element type of the source rows and of combine.
    var dtype: String
    /// FP8 dispatch: the scale mode (`--fp8`) and where the e4m3 rows come from (`--fp8-source`); null without.
    @AlwaysEncoded var fp8: String? = nil
    @AlwaysEncoded var fp8Source: String? = nil
    var ranks: Int
    /// Tokens per rank B each step dispatches (what the bytes and floors count).
    var tokens: Int
    /// The group's maxTokensPerRank where `--max-tokens` gave it (absent without: the group's is `tokens`).
    var maxTokensPerRank: Int? = nil
    var hidden: Int
    var topK: Int
    var experts: Int
    var iterations: Int
    var update: PhaseStats
    var dispatch: PhaseStats
    /// Update and dispatch in one call (one launch: the LL update inside the dispatch kernel);
    /// null where the group runs them as two launches. The step then reads this call + combine.
    @AlwaysEncoded var updateDispatch: PhaseStats? = nil
    /// Absent where the element type has no combine (u8); `combineSkipped` says why.
    var combine: PhaseStats?
    var combineSkipped: String?
    var step: PhaseStats
    /// GPU, virtual ranks: the step read in the phases' loops, an event recorded between its calls
    /// (how `step` was read until 2026-12; the events cost the GPU some µs between short kernels);
    /// null elsewhere.
    @AlwaysEncoded var stepWithPhaseEvents: PhaseStats? = nil
    /// Mean over ranks of the bytes the standard counting takes per rank (dispatch's; combine is the
    /// mirror, in the element type: with FP8 the two differ and each phase has its own).
    var bytesPerRank: Double
    /// Bytes read plus written by dispatch (combine: the same without FP8), and the copy bandwidth measured in this run.
    var floorBytes: Double
    var copyBandwidthGBs: Double
    var validated: Bool
    /// The rank that measured this (NCCL ranks: one process each); nil for a whole group.
    var rank: Int? = nil
    /// The GPU settings the group ran with (null on the CPU).
    @AlwaysEncoded var tuning: TuningRecord? = nil
    /// The run this belongs to (commit, device, options): the same in every entry of a file.
    var run: RunRecord? = nil
    /// GPU: whether a timed loop ran while the host was still enqueueing it, after three holds of
    /// the stream (its events may time the host's pace); null where nothing was held.
    var hostPaced: Bool? = nil

    /// Each phase's per-call time replayed from a CUDA graph.
    mutating func setGraphTimes(_ graphs: PhaseSamples.GraphTimes) {
        update.graphMicroseconds = graphs.update
        dispatch.graphMicroseconds = graphs.dispatch
        updateDispatch?.graphMicroseconds = graphs.updateDispatch
        combine?.graphMicroseconds = graphs.combine
        step.graphMicroseconds = graphs.step
    }

    static let combineSkippedNote = "u8 is dispatch only: combine needs bf16, f16 or f32"

    /// A result from its samples: `rank` nil for a whole group (bytes are the mean over ranks,
    /// the floor is every rank's), else one NCCL rank's share.
    init(
        _ benchCase: BenchCase, config: GroupConfig, backend: String, device: String, samples: PhaseSamples,
        bytes: StepBytes, copyBandwidth: Double, validated: Bool, rank: Int? = nil, stepNote: String? = nil
    ) {
        let counted = rank.map { bytes.countedRowsPerRank[$0] } ?? bytes.countedRowsPerRank.reduce(0, +)
        let ranksShared = Double(rank == nil ? config.ranks : 1), floorShare = Double(rank == nil ? 1 : config.ranks)
        // Dispatch moves its rows as they go on the wire (FP8: codes and scales); combine in the element type.
        let dispatchBytes = (perRank: Double(counted * bytes.wireRowBytes) / ranksShared, floor: Double(bytes.dispatchFloorBytes) / floorShare)
        let combineBytes = (perRank: Double(counted * bytes.rowBytes) / ranksShared, floor: Double(bytes.combineFloorBytes) / floorShare)
        func stats(_ s: [Double], _ phases: [(perRank: Double, floor: Double)], note: String? = nil) -> PhaseStats {
            PhaseStats(s, bytesPerRank: phases.map(\.perRank).reduce(0, +), floorBytes: phases.map(\.floor).reduce(0, +),
                       copyBandwidthGBs: copyBandwidth, note: note)
        }
        name = benchCase.name
        self.backend = backend
        self.device = device
        algorithm = config.algorithm.rawValue
        layout = "\(config.layout)"
        dtype = config.elementType.rawValue
        fp8 = config.fp8.map { FP8Choice.name(of: $0.scales) }
        fp8Source = config.fp8.map { FP8SourceChoice.name(of: $0.source) }
        ranks = config.ranks
        tokens = benchCase.tokens
        maxTokensPerRank = benchCase.maxTokens
        hidden = config.hidden
        topK = config.topK
        experts = config.experts
        iterations = samples.step.count
        update = PhaseStats(samples.update)
        dispatch = stats(samples.dispatch, [dispatchBytes])
        updateDispatch = samples.updateDispatch.map { stats($0, [dispatchBytes]) }
        combine = samples.combine.map { stats($0, [combineBytes]) }
        combineSkipped = samples.combine == nil ? Self.combineSkippedNote : nil
        // The step's floor is the dispatch floor plus the combine floor (the mirror image).
        let stepBytes = samples.combine == nil ? [dispatchBytes] : [dispatchBytes, combineBytes]
        step = stats(samples.step, stepBytes, note: stepNote)
        stepWithPhaseEvents = samples.stepWithPhaseEvents.map { stats($0, stepBytes) }
        bytesPerRank = dispatchBytes.perRank
        floorBytes = dispatchBytes.floor
        copyBandwidthGBs = copyBandwidth
        self.validated = validated
        self.rank = rank
    }
}

/// The GPU settings one group ran with: the SMs and blocks it was given, and every tuning knob
/// (rowPieces and blocksPerSM null: the automatic choice).
struct TuningRecord: Codable, Sendable {
    var multiprocessors: Int
    /// Thread blocks per rank in one launch (null where the group does not say: NCCL ranks).
    @AlwaysEncoded var blocksPerRank: Int?
    /// The combine's blocks per rank in one launch (the HT combine runs 2 per SM at every R).
    @AlwaysEncoded var combineBlocksPerRank: Int? = nil
    var pipelineDepth: Int
    var rowsInFlight: Int
    @AlwaysEncoded var rowPieces: Int?
    @AlwaysEncoded var blocksPerSM: Int?
    /// HT: tokens each update block counted (GPUTuning.updateChunkTokens).
    var updateChunkTokens: Int
    /// Whether every dispatch and combine launch took all its blocks (`--full-grid`: GPUTuning.fitsGridToWork off).
    var fullGrid: Bool
    /// Whether the step kernels went as programmatic dependent launches (`--serial-launches`
    /// off and the GPU and driver able); null where the group does not say.
    @AlwaysEncoded var dependentLaunches: Bool? = nil
    /// Whether update + dispatch ran as one launch (the `upd+disp` row); null where the group does not say.
    @AlwaysEncoded var fusedUpdate: Bool? = nil
}

extension Measurement {
    /// The dtype column: the element type, or `fp8/<scale mode>` (`/pass` for pass-through), as `BenchCase.dtypeName`.
    var dtypeName: String {
        guard let fp8 else { return dtype }
        return "fp8/\(fp8)" + (fp8Source == FP8SourceChoice.passThrough.rawValue ? "/pass" : "")
    }
}
