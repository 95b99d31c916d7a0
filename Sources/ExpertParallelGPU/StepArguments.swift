import ExpertParallel
import ExpertParallelCUDA

/// The kernels' one parameter, `EpArgs` of ep_step.cuh: every rank's `EpRankArgs` words (the peer
/// table), then the launch's own words. One block per group, refilled for each launch.
final class StepArguments {
    /// Words of one rank's `EpRankArgs`.
    static let rankWords = 12
    private let ranks: Int
    private let words: UnsafeMutableBufferPointer<UInt64>
    private var tail: Int { Self.rankWords * ranks }

    init(ranks: Int) {
        self.ranks = ranks
        words = .allocate(capacity: Self.rankWords * ranks + 6)
    }

    deinit { words.deallocate() }

    /// Fills every rank's words (`fill` sets the tensors; the workspace comes from `workspace`)
    /// and the launch's: mask, timeout, first rank, `EP_SYNC_*` bits, weighting, row pieces.
    func fill(
        workspace: (Int) -> DevicePointer, mask: DevicePointer, timeout: Duration, firstRank: Int, sync: UInt64,
        weighted: Bool, pieces: Int, rank fill: (Int, UnsafeMutableBufferPointer<UInt64>) -> Void
    ) {
        let n = Self.rankWords
        for rank in 0..<ranks {
            let rankWords = UnsafeMutableBufferPointer(rebasing: words[(rank * n)..<(rank * n + n)])
            rankWords.update(repeating: 0)
            fill(rank, rankWords)
            rankWords[7] = workspace(rank).rawValue
        }
        let (seconds, attoseconds) = timeout.components
        words[tail] = mask.rawValue
        words[tail + 1] = UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)
        words[tail + 2] = UInt64(firstRank)
        words[tail + 3] = sync
        words[tail + 4] = weighted ? 1 : 0
        words[tail + 5] = UInt64(pieces)
    }

    /// The rank of `blockIdx.y == 0` (separate launches per rank change only this word).
    func setFirstRank(_ rank: Int) { words[tail + 2] = UInt64(rank) }

    /// Launches `function` with the block as its parameter (the driver copies it at launch).
    func launch(_ function: CUDAFunction, on device: GPUDevice, grid: LaunchDimensions, threads: Int, stream: CUDAStream) throws {
        var parameter: UnsafeMutableRawPointer? = UnsafeMutableRawPointer(words.baseAddress!)
        try withUnsafeMutablePointer(to: &parameter) { parameters in
            try device.driver.launch(function, grid: grid, block: .init(x: UInt32(threads)), stream: stream, parameters: parameters)
        }
    }

    /// Pieces each token row is cut into, so that every warp of a rank's `blocks` has work: the
    /// tuning's choice, else as many as warps per token, at least two vectors per lane each.
    static func rowPieces(_ tuning: GPUTuning, blocks: Int, tokens: Int, rowBytes: Int) -> Int {
        if let pieces = tuning.rowPieces { return pieces }
        let warps = blocks * (VirtualGPUGroup.threadsPerBlock / 32)
        return min(max(1, warps / max(tokens, 1)), max(1, rowBytes / 16 / 64))
    }
}

extension GPUDevice {
    /// A device word holding the active-rank mask, all `ranks` active.
    func allocateMask(ranks: Int) throws(EPError) -> DevicePointer {
        let mask = try gpu { try driver.allocate(byteCount: 8) }
        try gpu { try driver.copy([RankMask.all(ranks).bits], to: mask) }
        return mask
    }
}
