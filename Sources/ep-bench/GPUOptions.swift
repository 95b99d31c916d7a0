import ArgumentParser
import ExpertParallelGPU

/// The GPU's options: the SMs the group may use (a sweep when several are given) and the
/// kernels' tuning knobs. The CPU backend runs no kernels: any of them there is a usage error
/// (`given`, `RunCommand+Applicable.swift`), which each one's help says ("GPU only"). Knobs with a default keep what was given apart
/// (`given...`), so that a default is not taken for an option given.
struct GPUOptions: ParsableArguments {
    @Option(name: .customLong("sms"), parsing: .unconditionalSingleValue, help: "GPU only: streaming multiprocessors the group may use, 1...4096 and at most the device's (default: all). A list (--sms 16,32,66,132, or the option repeated) runs every case once per count; with --transport nccl, every rank's group uses that many of its GPU's SMs.", transform: NumberArgument.wholeList(Bounds.sms))
    var smsLists: [[Int]] = []

    @Option(name: .customLong("pipeline-depth"), parsing: .unconditional, help: ArgumentHelp("GPU only: dispatch pipeline depth, vectors each lane loads before storing (1...8). (default: 4)", valueName: "pipeline-depth"), transform: NumberArgument.whole(Bounds.pipelineDepth))
    var givenPipelineDepth: Int?
    var pipelineDepth: Int { givenPipelineDepth ?? 4 }

    @Option(name: .customLong("rows-in-flight"), parsing: .unconditional, help: ArgumentHelp("GPU only: combine rows loaded before the first is used (1...16). (default: 8)", valueName: "rows-in-flight"), transform: NumberArgument.whole(Bounds.rowsInFlight))
    var givenRowsInFlight: Int?
    var rowsInFlight: Int { givenRowsInFlight ?? 8 }

    @Option(parsing: .unconditional, help: "GPU only: pieces each token row is cut into, one warp each: 1...4096, at most a row's 16-byte vectors (default: automatic).", transform: NumberArgument.whole(Bounds.rowPieces))
    var rowPieces: Int?

    @Option(name: .customLong("blocks-per-sm"), parsing: .unconditional, help: "GPU only: 512-thread blocks per SM in one launch (1 or 2; default 2, 1 for R = 1 except the HT combine).", transform: NumberArgument.whole(Bounds.blocksPerSM))
    var blocksPerSM: Int?

    @Option(name: .customLong("update-chunk-tokens"), parsing: .unconditional, help: ArgumentHelp("GPU only, HT: tokens each update block counts (1...4096; the update runs up to 16 blocks a rank). (default: 256)", valueName: "update-chunk-tokens"), transform: NumberArgument.whole(Bounds.updateChunkTokens))
    var givenUpdateChunkTokens: Int?
    var updateChunkTokens: Int { givenUpdateChunkTokens ?? 256 }

    @Flag(help: "GPU only: every dispatch and combine launch takes all its blocks, however few the tokens (default: only the blocks the work needs).")
    var fullGrid = false

    @Flag(help: "GPU only: plain launches, none of them a programmatic dependent launch (default: dependent launches where the GPU and driver can).")
    var serialLaunches = false

    @Flag(inversion: .prefixedNo, help: "GPU only, LL: the update inside the dispatch's launch (the upd+disp row) or not (default: so for virtual ranks and one NCCL rank, not at NCCL ranks with peers).")
    var fusedUpdate: Bool?

    enum Bounds {
        static let sms = 1...4_096
        static let pipelineDepth = 1...8
        static let rowsInFlight = 1...16
        static let rowPieces = 1...4_096
        static let blocksPerSM = 1...2
        static let updateChunkTokens = 1...4_096
    }

    /// The SM counts to sweep, in the order given, each once (empty: one run with every SM).
    var smCounts: [Int] {
        var seen: [Int] = []
        for count in smsLists.joined() where !seen.contains(count) { seen.append(count) }
        return seen
    }

    var tuning: GPUTuning {
        GPUTuning(pipelineDepth: pipelineDepth, rowsInFlight: rowsInFlight, rowPieces: rowPieces, blocksPerMultiprocessor: blocksPerSM,
                  fusesUpdate: fusedUpdate, updateChunkTokens: updateChunkTokens, fitsGridToWork: !fullGrid, overlapsLaunches: !serialLaunches)
    }

    var record: TuningOptions {
        TuningOptions(sms: smCounts, pipelineDepth: pipelineDepth, rowsInFlight: rowsInFlight, rowPieces: rowPieces, blocksPerSM: blocksPerSM,
                      updateChunkTokens: updateChunkTokens, fullGrid: fullGrid, serialLaunches: serialLaunches, fusedUpdate: fusedUpdate)
    }

    func validate() throws {
        for count in smsLists.joined() { try checkRange("--sms", count, Bounds.sms) }
        try checkRange("--pipeline-depth", pipelineDepth, Bounds.pipelineDepth)
        try checkRange("--rows-in-flight", rowsInFlight, Bounds.rowsInFlight)
        try checkRange("--row-pieces", rowPieces, Bounds.rowPieces)
        try checkRange("--blocks-per-sm", blocksPerSM, Bounds.blocksPerSM)
        try checkRange("--update-chunk-tokens", updateChunkTokens, Bounds.updateChunkTokens)
    }

    /// The options given, as the command line writes them (`--sms 16,32`, `--full-grid`), in the
    /// order of `--help`.
    var given: [String] {
        let values: [(String, String?)] = [
            ("--sms", smCounts.isEmpty ? nil : smCounts.map(String.init).joined(separator: ",")),
            ("--pipeline-depth", givenPipelineDepth.map(String.init)), ("--rows-in-flight", givenRowsInFlight.map(String.init)),
            ("--row-pieces", rowPieces.map(String.init)), ("--blocks-per-sm", blocksPerSM.map(String.init)),
            ("--update-chunk-tokens", givenUpdateChunkTokens.map(String.init)),
        ]
        return values.compactMap { option, value in value.map { "\(option) \($0)" } }
            + (fullGrid ? ["--full-grid"] : []) + (serialLaunches ? ["--serial-launches"] : [])
            + (fusedUpdate.map { [$0 ? "--fused-update" : "--no-fused-update"] } ?? [])
    }

    /// Every count must fit the device (the library would refuse it at the first group).
    func check(device multiprocessors: Int) throws {
        for count in smCounts where count > multiprocessors {
            throw ValidationError("--sms \(count) is out of range: this GPU has \(multiprocessors) SMs (must be in 1...\(multiprocessors))")
        }
    }
}
