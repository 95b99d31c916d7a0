import ExpertParallel
import ExpertParallelCUDA

/// A field of one rank's `EpRankArgs` (ep_step.cuh), in the kernel's order: field i is the
/// 8-byte word at byte 8 i. `macro` is its name in the kernel's `EP_RANK_FIELDS` list; the host
/// passes each offset as `EP_OFF_RANK_<macro>` and the kernel checks it at compile time.
enum RankField: Int, CaseIterable {
    case tokens = 0, topkIdx, topkWeights, received, receivedIndices, receivedWeights, output, workspace, tokenCount,
         weightGradientsIn, weightGradientsOut, handle, stage, counts, sourceCounts, scales, receivedScales

    var macro: String {
        switch self {
        case .tokens: "X"
        case .topkIdx: "TOPK_IDX"
        case .topkWeights: "TOPK_WEIGHTS"
        case .received: "RECV"
        case .receivedIndices: "RECV_IDX"
        case .receivedWeights: "RECV_WEIGHTS"
        case .output: "OUT"
        case .workspace: "WORKSPACE"
        case .tokenCount: "TOKENS"
        case .weightGradientsIn: "WEIGHT_GRADS_IN"
        case .weightGradientsOut: "WEIGHT_GRADS_OUT"
        case .handle: "HANDLE"
        case .stage: "STAGE"
        case .counts: "COUNTS"
        case .sourceCounts: "SOURCE_COUNTS"
        case .scales: "SCALES"
        case .receivedScales: "RECV_SCALES"
        }
    }
}

/// A field of `EpArgs` after the ranks' words: what the launch itself says.
enum LaunchField: Int, CaseIterable {
    case mask = 0, timeoutNanoseconds, firstRank, sync, weighted, slices

    var macro: String {
        switch self {
        case .mask: "MASK"
        case .timeoutNanoseconds: "TIMEOUT_NS"
        case .firstRank: "FIRST_RANK"
        case .sync: "SYNC"
        case .weighted: "WEIGHTED"
        case .slices: "SLICES"
        }
    }
}

/// One rank's words of the argument block, written by field name.
struct RankArguments {
    let words: UnsafeMutableBufferPointer<UInt64>

    subscript(field: RankField) -> UInt64 {
        get { words[field.rawValue] }
        nonmutating set { words[field.rawValue] = newValue }
    }

    func set(_ field: RankField, _ pointer: DevicePointer) { self[field] = pointer.rawValue }
}

/// `EP_SYNC_*` of ep_step.cuh: which flags a launch publishes and waits for.
struct SyncBits: OptionSet {
    let rawValue: UInt64
    static let signal = SyncBits(rawValue: 1)
    static let wait = SyncBits(rawValue: 2)
    static let noData = SyncBits(rawValue: 4)
    static let done = SyncBits(rawValue: 8)
}

/// The kernels' one parameter, `EpArgs` of ep_step.cuh: every rank's `EpRankArgs` (the peer
/// table), then the launch's own fields. One block per group, refilled for each launch.
final class StepArguments {
    static let rankBytes = RankField.allCases.count * 8
    private let ranks: Int
    private let words: UnsafeMutableBufferPointer<UInt64>
    private var tail: Int { RankField.allCases.count * ranks }

    init(ranks: Int) {
        self.ranks = ranks
        words = .allocate(capacity: RankField.allCases.count * ranks + LaunchField.allCases.count)
        words.initialize(repeating: 0)
    }

    deinit { words.deallocate() }

    /// The -D defines that tell the kernel where the host writes each field; the kernel
    /// `static_assert`s its own layout against them (EP_HOST_CONTRACT in ep_step.cuh).
    static func contractDefines(ranks: Int) -> [String: String] {
        var defines = ["EP_HOST_CONTRACT": "1", "EP_RANK_ARGS_BYTES": "\(rankBytes)",
                       "EP_ARGS_BYTES": "\(rankBytes * ranks + LaunchField.allCases.count * 8)"]
        for field in RankField.allCases { defines["EP_OFF_RANK_\(field.macro)"] = "\(field.rawValue * 8)" }
        for field in LaunchField.allCases { defines["EP_OFF_\(field.macro)"] = "\(rankBytes * ranks + field.rawValue * 8)" }
        return defines
    }

    /// Rank `rank`'s words.
    func rank(_ rank: Int) -> RankArguments {
        let n = RankField.allCases.count
        return RankArguments(words: UnsafeMutableBufferPointer(rebasing: words[(rank * n)..<(rank * n + n)]))
    }

    subscript(field: LaunchField) -> UInt64 {
        get { words[tail + field.rawValue] }
        set { words[tail + field.rawValue] = newValue }
    }

    /// Clears every rank's words, then sets the launch's.
    func reset(mask: DevicePointer, timeout: Duration, firstRank: Int, sync: SyncBits, weighted: Bool, slices: Int) {
        UnsafeMutableBufferPointer(rebasing: words[0..<tail]).update(repeating: 0)
        let (seconds, attoseconds) = timeout.components
        self[.mask] = mask.rawValue
        self[.timeoutNanoseconds] = UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)
        self[.firstRank] = UInt64(firstRank)
        self[.sync] = sync.rawValue
        self[.weighted] = weighted ? 1 : 0
        self[.slices] = UInt64(slices)
    }

    /// Launches `function` with the block as its parameter (the driver copies it at launch);
    /// `dependent`: as a programmatic dependent launch (every step kernel waits for the grids
    /// before it first, `ep_grid_dependency` in ep_common.cuh).
    func launch(_ function: CUDAFunction, on device: GPUDevice, grid: LaunchDimensions, threads: Int, stream: CUDAStream, dependent: Bool) throws {
        var parameter: UnsafeMutableRawPointer? = UnsafeMutableRawPointer(words.baseAddress!)
        try withUnsafeMutablePointer(to: &parameter) { parameters in
            try device.driver.launch(function, grid: grid, block: .init(x: UInt32(threads)), stream: stream, dependent: dependent,
                                     parameters: parameters)
        }
    }

    /// Pieces each token row is cut into, so that every warp of a rank's `blocks` has work: the
    /// tuning's choice, else as many as warps per token, at least two vectors per lane each; or
    /// one vector per lane where pieces of two would leave more than half the warps without work
    /// (few tokens: each warp's loads and sums are a chain of round trips, and halving it pays).
    /// An H200, one launch of 8 virtual ranks / one rank, µs per call replayed in a graph: ll-1
    /// dispatch 4.23 → 3.46 / 3.95 → 3.23, combine 5.31 → 4.05 / 4.95 → 3.70; ll-32 at R = 1
    /// dispatch 4.47 → 3.44, combine 5.54 → 4.14. Where two vectors per lane keep half the warps
    /// busy (ll-std at R = 1, ll-32 at R = 8) one was slower or no faster.
    static func rowPieces(_ tuning: GPUTuning, blocks: Int, tokens: Int, rowBytes: Int) -> Int {
        if let pieces = tuning.rowPieces { return pieces }
        let warps = blocks * (StepWorkspace.threadsPerBlock / 32), tokens = max(tokens, 1)
        let twoPerLane = max(1, rowBytes / 16 / 64)
        let cap = tokens * twoPerLane * 2 <= warps ? max(1, rowBytes / 16 / 32) : twoPerLane
        return min(max(1, warps / tokens), cap)
    }

    /// Blocks a rank's launch takes for `items` items of one warp each (a token's row pieces):
    /// `blocks`, or fewer where fewer give every item a warp (`tuning.fitsGridToWork`). A launch
    /// of few tokens then starts, and meets at its end, a few blocks instead of every SM's (the
    /// kernels' loops stride over whatever grid they get).
    static func blocks(_ tuning: GPUTuning, _ blocks: Int, items: Int) -> Int {
        guard tuning.fitsGridToWork else { return blocks }
        let warps = StepWorkspace.threadsPerBlock / 32
        return min(blocks, max(1, (items + warps - 1) / warps))
    }
}

extension GPUDevice {
    /// A device word holding the active-rank mask, all `ranks` active.
    func allocateMask(ranks: Int) throws(EPError) -> DevicePointer {
        let mask = try gpu { try driver.allocate(byteCount: 8) }
        do {
            try gpu { try driver.copy([RankMask.all(ranks).bits], to: mask) }
            try waitForLegacyStream()
        } catch {
            try? driver.free(mask)
            throw error
        }
        return mask
    }
}
