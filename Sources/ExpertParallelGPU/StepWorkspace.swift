import ExpertParallel

/// Word offsets of one rank's group workspace (`WS_*` of ep_step.cuh and of ep_ll.cu / ep_ht.cu)
/// and of one rank's words of a step handle (`H_*`). The kernels check every offset the host
/// uses against their own at compile time (`defines`, EP_HOST_CONTRACT).
struct StepWorkspace: Sendable {
    let algorithm: Algorithm
    let ranks: Int, localExperts: Int, topK: Int, maxTokens: Int
    /// LL: warps with their own counts in the update (EP_UPDATE_WARPS); HT: 16.
    let updateWarps: Int
    /// Update blocks per rank: LL one; HT one per chunk of the tokens (EP_HT_CHUNKS).
    let updateBlocks: Int
    /// LL: whether ep_ll_update_dispatch is compiled (EP_FUSED): the update fits in a dispatch block.
    let fused: Bool
    /// LL: whether the update counts with bitmaps (EP_LL_BITMAP), else per warp.
    let bitmaps: Bool
    /// LL: whether the fused kernel's dispatch blocks may find their rows themselves
    /// (EP_LL_OWN_FITS; EP_LL_OWN_ROWS=0 turns it off). They read every rank's routing, so only
    /// where the launch has them all (virtual ranks) or there is one rank; an NCCL rank of several
    /// waits for its update block's rows instead.
    let ownRows: Bool
    /// Rows of each rank's receive buffer; the staged transport keeps each row's origin per step.
    let receiveRows: Int
    let transport: GPUTransport
    var experts: Int { ranks * localExperts }

    /// `everyRankHere`: every rank of the group runs in this process (virtual ranks), so a launch
    /// can read every rank's routing.
    init(_ config: GroupConfig, transport: GPUTransport = .direct, updateChunkTokens: Int = GPUTuning().updateChunkTokens,
         everyRankHere: Bool = true) {
        self.transport = transport
        receiveRows = config.receiveCapacity
        algorithm = config.algorithm
        ranks = config.ranks
        localExperts = config.localExperts
        topK = config.topK
        maxTokens = config.maxTokensPerRank
        updateWarps = config.algorithm == .lowLatency ? config.llUpdateWarps : 16
        updateBlocks = config.algorithm == .lowLatency ? 1 : Self.htUpdateChunks(maxTokens: config.maxTokensPerRank, tokensPerChunk: updateChunkTokens)
        fused = config.fusesLLUpdate && transport == .direct
        bitmaps = config.llUpdateUsesBitmaps
        ownRows = fused && config.llOwnRowsFit && (everyRankHere || config.ranks == 1)
    }

    /// Threads of a dispatch or combine block (EP_WARPS × 32).
    static let threadsPerBlock = 512
    /// Threads of each update block (EP_UPDATE_WARPS, EP_HT_UPDATE_WARPS).
    var updateThreads: Int { updateWarps * 32 }
    /// HT update chunks: one block per `tokensPerChunk` tokens of the largest step (GPUTuning,
    /// default 256), at most 16. One block walked 4096 tokens in ~90 µs on an H200 (each warp's
    /// in-order counting is a chain of dependent shared-memory updates); 16 blocks of 256 tokens
    /// walk them side by side, and only the rank's last block to finish does the cross-rank part.
    static func htUpdateChunks(maxTokens: Int, tokensPerChunk: Int) -> Int {
        // ⌈maxTokens / tokensPerChunk⌉ without adding them (GPUTuning checks the chunk ≥ 1 only).
        let chunk = max(1, tokensPerChunk)
        return min(16, max(1, maxTokens / chunk + (maxTokens % chunk == 0 ? 0 : 1)))
    }

    // MARK: the group's words

    static let sequence = 0
    static let status = 1
    static let dispatchCalls = 5
    static let combineCalls = 9
    var counts: Int { 10 + 4 * ranks }
    private var countTable: Int { 2 * ranks * (experts + ranks) }
    /// HT keeps a second all-gathered table after the counts: the kept counts of the drop policy.
    var words: Int { counts + countTable * (algorithm == .highThroughput ? 2 : 1) }
    var bytes: Int { words * 4 }

    // MARK: a step handle's words, per rank

    static let stepOK = 0
    /// Words every algorithm's handle starts with (H_STEP_OK, H_SEQ, and the fused kernel's
    /// H_READY, H_TICKET, H_PASSED); H_COMMON.
    static let commonWords = 5
    /// `[L]` expert counters, `[R]` source counters, `[L][R]`, total; HT adds dropped and `[L]` zone starts.
    var layout: Int {
        switch algorithm {
        case .lowLatency: Self.commonWords + maxTokens * topK + maxTokens * ranks
        case .highThroughput:
            // Routing, destinations, selection rows, pair rows, the chunks' counts, arrived (and bad chunks).
            Self.commonWords + maxTokens * topK + maxTokens + maxTokens * topK + maxTokens * ranks + updateBlocks * (experts + ranks) + 1
        }
    }
    var layoutWords: Int {
        let common = localExperts + ranks + localExperts * ranks + 1
        return algorithm == .lowLatency ? common : common + 1 + localExperts
    }
    /// Staged transport: `[receive rows]` origin of each received row (H_ORIGIN), after the layout.
    var origins: Int { layout + layoutWords }
    var handleWords: Int { origins + (transport == .staged ? receiveRows : 0) }
    /// Bytes of one rank's handle words, rounded up to 256 so every rank's words start aligned.
    var handleStride: Int { (handleWords * 4 + 255) / 256 * 256 }

    /// The offsets and constants the kernels check against their own (EP_HOST_*).
    var defines: [String: String] {
        [
            "EP_HOST_WS_STATUS": "\(Self.status)", "EP_HOST_WS_DISP_CALLS": "\(Self.dispatchCalls)",
            "EP_HOST_WS_COMB_CALLS": "\(Self.combineCalls)", "EP_HOST_WS_COUNTS": "\(counts)", "EP_HOST_WS_WORDS": "\(words)",
            "EP_HOST_H_STEP_OK": "\(Self.stepOK)", "EP_HOST_H_LAYOUT": "\(layout)", "EP_HOST_H_WORDS": "\(handleWords)",
            "EP_HOST_THREADS": "\(Self.threadsPerBlock)", "EP_HOST_UPDATE_THREADS": "\(updateThreads)",
            "EP_HOST_H_COMMON": "\(Self.commonWords)", "EP_UPDATE_WARPS": "\(updateWarps)", "EP_FUSED": fused ? "1" : "0",
            "EP_LL_BITMAP": bitmaps ? "1" : "0", "EP_LL_OWN_FITS": ownRows ? "1" : "0", "EP_HT_CHUNKS": "\(updateBlocks)",
        ]
    }
}

/// Device status codes of ep_step.cuh (`EP_STATUS_*`).
enum DeviceStatus: UInt32 {
    case ok = 0, indexRange = 1, repeatedExpert = 2, timeout = 3, peerFailed = 4, overflow = 5

    /// The error that rank `rank`'s status words `[code, a, b, c]` record, or nil for none.
    static func error(_ words: [UInt32], rank: Int, config: GroupConfig) -> EPError? {
        switch DeviceStatus(rawValue: words[0]) {
        case .ok?: nil
        case .indexRange?:
            .invalidArgument(
                field: "topkIdx[rank \(rank)][\(words[1])][\(words[2])]", value: "\(Int32(bitPattern: words[3]))",
                requirement: "must be -1 or in [0, \(config.experts))")
        case .repeatedExpert?:
            .repeatedExpert(token: Int(words[1]), firstColumn: Int(words[2] >> 16), secondColumn: Int(words[2] & 0xffff), expert: Int(words[3]), rank: rank)
        case .timeout?:
            .timeout(rank: rank, missing: [Int(words[1])])
        case .overflow?:
            .overflow(rank: Int(words[1]), required: Int(words[2]), capacity: Int(words[3]))
        case .peerFailed?:
            .peerFailed(rank: rank, peer: Int(words[1]), reason: EPError.invalidRoutingReason)
        case nil:
            .backend("rank \(rank): unknown device status \(words[0])")
        }
    }
}

extension StepWorkspace {
    /// The layout words of a rank's handle as `LayoutInfo`.
    func layoutInfo(_ words: [Int], config: GroupConfig) -> LayoutInfo {
        let l = localExperts, r = ranks, total = l + r + l * r
        let offsets = switch config.layout {
        case .expertMajor: (0..<l).map { $0 * r * config.maxTokensPerRank }
        case .expertMajorPadded: Array(words[(total + 2)..<(total + 2 + l)])
        case .rankMajor, .flat: Array(repeating: 0, count: l)
        }
        return LayoutInfo(
            expertCounters: Array(words[0..<l]), expertOffsets: offsets, sourceRankCounters: Array(words[l..<(l + r)]),
            expertSourceCounters: Array(words[(l + r)..<total]), receivedTotal: words[total],
            droppedTokens: algorithm == .highThroughput ? words[total + 1] : 0)
    }
}
