import ExpertParallel

/// Run-time settings of a GPU group's kernels. The kernels are compiled on first use, so what
/// other libraries fix at build time is a setting here. The defaults are the measured best on an
/// H100 (docs/performance.md); other values are for tuning on other devices and shapes.
public struct GPUTuning: Sendable, Hashable {
    /// Dispatch pipeline depth: 16-byte vectors each lane loads before it stores them (1...8).
    public var pipelineDepth: Int
    /// Combine: rows whose vectors are loaded before the first is used (1...16).
    public var rowsInFlight: Int
    /// Pieces each token row is cut into, one warp per piece; nil picks enough pieces to give every
    /// warp of the rank's blocks work.
    public var rowPieces: Int?
    /// Thread blocks per SM in one launch covering all ranks (1 or 2); nil: 2 for R ≥ 2, 1 for R = 1
    /// (the HT combine: 2 at every R).
    public var blocksPerMultiprocessor: Int?
    /// LL: run a stacked dispatch's update inside the dispatch launch (one launch instead of two;
    /// the rank's other blocks find their rows themselves, or wait on the GPU for its update
    /// block). Off: two launches, as the separate update and dispatch calls always are. Same
    /// results either way. nil (automatic): on for virtual groups and an NCCL group of one rank;
    /// off at an NCCL rank with peers, whose fused launch would hold its dispatch blocks, every SM's
    /// worth, spinning until the slowest peer's counts arrive (two launches hold one block), and
    /// which no multi-GPU run has measured yet.
    public var fusesUpdate: Bool?
    /// Dispatch and combine launch only the blocks their work needs, one warp an item (a token's
    /// row piece), up to the SMs' worth: a step of a few tokens starts and synchronises a few
    /// blocks, not every SM's. Off: every launch takes all of them. Same results either way.
    public var fitsGridToWork: Bool
    /// HT: tokens each update block counts (the update runs ⌈max tokens per rank ÷ this⌉ blocks
    /// per rank, at most 16; only the rank's last block to finish waits for the peers).
    public var updateChunkTokens: Int
    /// The step kernels of a virtual group launch as programmatic dependent launches where the
    /// device and driver can (`GPUDevice.launchesDependents`; NCCL ranks: plain for now): a
    /// launch's blocks start while the kernel before it in the stream finishes, and wait on the
    /// GPU (`griddepcontrol.wait`) for its results, so the gap between dependent launches
    /// (dispatch, then combine; the HT update, then dispatch) shrinks; a launch after an event or
    /// a copy is unaffected. Off: plain launches. Same results either way.
    public var overlapsLaunches: Bool

    public init(pipelineDepth: Int = 4, rowsInFlight: Int = 8, rowPieces: Int? = nil, blocksPerMultiprocessor: Int? = nil, fusesUpdate: Bool? = nil,
                updateChunkTokens: Int = 256, fitsGridToWork: Bool = true, overlapsLaunches: Bool = true) {
        self.overlapsLaunches = overlapsLaunches
        self.fusesUpdate = fusesUpdate
        self.fitsGridToWork = fitsGridToWork
        self.updateChunkTokens = updateChunkTokens
        self.pipelineDepth = pipelineDepth
        self.rowsInFlight = rowsInFlight
        self.rowPieces = rowPieces
        self.blocksPerMultiprocessor = blocksPerMultiprocessor
    }

    /// Itself, after checking `config` (`validated()`) and then every knob against its bounds for
    /// it (named errors: `name.rowPieces`, `name` the struct that carries the knobs, such as the C
    /// ABI's `backend.tuning`).
    public func validated(_ config: GroupConfig, as name: String = "tuning") throws(EPError) -> Self {
        let config = try config.validated()
        func fail(_ field: String, _ value: Int, _ requirement: String) -> EPError {
            .invalidArgument(field: "\(name).\(field)", value: "\(value)", requirement: requirement)
        }
        guard (1...8).contains(pipelineDepth) else { throw fail("pipelineDepth", pipelineDepth, "must be in 1...8") }
        guard (1...16).contains(rowsInFlight) else { throw fail("rowsInFlight", rowsInFlight, "must be in 1...16") }
        let vectors = max(1, config.rowBytes / 16)
        if let rowPieces {
            guard (1...vectors).contains(rowPieces) else {
                throw fail("rowPieces", rowPieces, "must be in 1...\(vectors) (16-byte vectors in a row)")
            }
            // The kernels number a rank's items (token × piece) in 32-bit ints.
            guard config.maxTokensPerRank * rowPieces <= Int(Int32.max) else {
                throw fail("rowPieces", rowPieces, "must be ≤ \(Int(Int32.max) / config.maxTokensPerRank) with maxTokensPerRank \(config.maxTokensPerRank) (the kernels count token × piece in 32 bits)")
            }
        }
        guard updateChunkTokens >= 1 else { throw fail("updateChunkTokens", updateChunkTokens, "must be at least 1") }
        if let blocks = blocksPerMultiprocessor, !(1...2).contains(blocks) {
            throw fail("blocksPerMultiprocessor", blocks, "must be 1 or 2 (two 512-thread blocks fill an SM's registers)")
        }
        return self
    }

    var defines: [String: String] { ["EP_UNROLL": "\(pipelineDepth)", "EP_CHUNK": "\(rowsInFlight)"] }
}
