import ExpertParallel

extension GroupConfig {
    /// The bounds of the GPU backend on top of `validated()`: ranks fit the kernels' 32-bit
    /// destination masks and lanes, HT tokens the update's 24-bit places, and the update kernel's
    /// static shared memory fits 48 KB.
    package func validatedForGPU() throws(EPError) -> Self {
        let config = try validated()
        guard ranks <= 32 else {
            throw .invalidConfig(field: "ranks", value: "\(ranks)", requirement: "must be ≤ 32 on the GPU backend")
        }
        guard experts <= 1024 else {
            throw .invalidConfig(field: "experts", value: "\(experts)", requirement: "must be ≤ 1024 on the GPU backend")
        }
        guard algorithm == .lowLatency || maxTokensPerRank <= Self.maxHTTokensPerRank else {
            throw .invalidConfig(
                field: "maxTokensPerRank", value: "\(maxTokensPerRank)",
                requirement: "must be ≤ \(Self.maxHTTokensPerRank) for HT on the GPU backend (the update stores a pair's place in its chunk in 24 bits)")
        }
        if algorithm == .highThroughput {
            // The HT kernels count a destination's rows in 32-bit ints: the rows its sources could
            // send it (flat: each token once; expert-major: once per local expert it selects, plus
            // each zone's padding) and its capacity must both fit.
            let worst = isExpertMajorHT
                ? ranks * maxTokensPerRank * min(topK, localExperts) + localExperts * (alignment - 1) : ranks * maxTokensPerRank
            guard worst <= Self.maxGPURows else {
                throw .invalidConfig(
                    field: "maxTokensPerRank", value: "\(maxTokensPerRank)",
                    requirement: "with \(ranks) ranks, topK \(topK) and \(localExperts) local experts a rank could receive \(worst) rows; the GPU backend counts at most \(Self.maxGPURows)")
            }
            guard receiveCapacity <= Self.maxGPURows else {
                throw .invalidConfig(
                    field: "maxReceivedTokensPerRank", value: "\(receiveCapacity)", requirement: "must be ≤ \(Self.maxGPURows) on the GPU backend")
            }
        }
        let bytes = updateSharedMemoryBytes
        guard bytes <= 48 * 1024 else {
            throw .invalidConfig(
                field: "maxTokensPerRank", value: "\(maxTokensPerRank)",
                requirement: "with topK \(topK), \(experts) experts and \(ranks) ranks the update kernel needs \(bytes) bytes of shared memory; at most 49152")
        }
        // The GPU backend sizes buffers from the configuration (an NCCL rank's receive and
        // expert-output rows, the staged transport's staging): receiveCapacity rows of rowBytes,
        // whose product the bounds above let pass Int.max. 2^62 bytes, far beyond any device's
        // memory, keeps every such size inside Int.
        let (receiveBytes, overflow) = receiveCapacity.multipliedReportingOverflow(by: rowBytes)
        guard !overflow, receiveBytes <= Self.maxGPUBufferBytes else {
            throw .invalidConfig(
                field: "hidden", value: "\(hidden)",
                requirement: "with \(receiveCapacity) receive rows of \(rowBytes) bytes a rank's receive buffer is more than 2^62 bytes; the GPU backend allocates at most 2^62")
        }
        return config
    }

    /// HT on the GPU: tokens a rank may send at most (EP_HT_PLACE_MASK of ep_ht.cu).
    package static let maxHTTokensPerRank = (1 << 24) - 1
    /// Rows the GPU kernels count in a rank's receive buffer at most (32-bit ints).
    package static let maxGPURows = Int(Int32.max)
    /// Bytes of a rank's receive buffer at most (receiveCapacity × rowBytes).
    package static let maxGPUBufferBytes = 1 << 62

    /// Static shared memory of the update kernel, counted from its arrays (ep_ll.cu, ep_ht.cu), with
    /// LL's per-warp counts for 8 warps: the bound every configuration must meet.
    var updateSharedMemoryBytes: Int { updateSharedMemoryBytes(warps: 8) }

    /// The same with LL's per-warp counts for `warps` warps (HT always has 16).
    func updateSharedMemoryBytes(warps: Int) -> Int {
        let e = experts, r = ranks
        let words = switch algorithm {
        // counts[warps][E + R], routing[Bmax * K], destinations[Bmax], two flags.
        case .lowLatency: warps * (e + r) + maxTokensPerRank * (topK + 1) + 2
        // counts[16][E + R], zone_start[E], required[R], before[E + R], flags; the drop policy adds
        // kept_tokens[R], kept_counts[E + R] and zone_count[L].
        case .highThroughput: 18 * (e + r) + 4 + (overflow == .drop ? e + 2 * r + localExperts : 0)
        }
        return words * 4
    }

    /// Static shared memory of the fused LL update + dispatch kernel besides the update's arrays:
    /// the dispatch's row table (EpWarpRows: 16 warps × 32 lanes of an address and a weight, and with
    /// FP8 a scale address) and a few words.
    var fusedDispatchSharedMemoryBytes: Int { 16 * 32 * (8 + 4 + (fp8 != nil ? 8 : 0)) + 64 }

    /// Whether the fused kernel's dispatch blocks can find their rows themselves (EP_LL_OWN in
    /// ep_ll.cu): they read other ranks' tokens a thread per token, its K ids at once, so K ≤ 8
    /// where there are other ranks.
    var llDispatchFindsOwnRows: Bool { ranks == 1 || topK <= 8 }

    /// The fused kernel's dispatch blocks' own rows (EpOwnRows): [E + R][ceil(Bmax / 32)] words of
    /// bits, E counts and a flag.
    var llOwnRowsSharedMemoryBytes: Int { 4 * ((experts + ranks) * ((maxTokensPerRank + 31) / 32) + experts + 1) }

    /// LL: the fused kernel's dispatch blocks find their rows themselves (EP_LL_OWN_FITS): the update
    /// counts with bitmaps, K allows it, and their rows fit beside the update's arrays and the
    /// dispatch's table in 48 KB; elsewhere they wait for the update block's rows (the update's
    /// choices do not depend on this).
    var llOwnRowsFit: Bool {
        llUpdateUsesBitmaps && llDispatchFindsOwnRows
            && llBitmapUpdateSharedMemoryBytes + llOwnRowsSharedMemoryBytes + fusedDispatchSharedMemoryBytes <= 48 * 1024
    }

    /// LL's update counting with bitmaps (EP_LL_BITMAP): its static shared memory, from its arrays
    /// (ep_ll.cu): the experts' bits and prefixes (or, later, the layout's scratch), the ranks'
    /// bits and prefixes, routing[Bmax * K], totals[E + R] and three flags.
    var llBitmapUpdateSharedMemoryBytes: Int {
        let words = (maxTokensPerRank + 31) / 32, e = experts, r = ranks
        let scratch = max(2 * e * words, 2 * e + localExperts + r)
        return 4 * (scratch + 2 * r * words + maxTokensPerRank * topK + e + r + 3)
    }

    /// LL: the update counts with bitmaps (every selection's position at once) where they fit
    /// beside the fused kernel's dispatch table; else per warp, in token order.
    var llUpdateUsesBitmaps: Bool {
        algorithm == .lowLatency && llBitmapUpdateSharedMemoryBytes + fusedDispatchSharedMemoryBytes <= 48 * 1024
    }

    /// LL: the update's warps (EP_UPDATE_WARPS; counting per warp, the warps with counts of their
    /// own): 16 (a dispatch block's, half the serial passes of 8) where they fit, else 8.
    var llUpdateWarps: Int {
        llUpdateUsesBitmaps || updateSharedMemoryBytes(warps: 16) + fusedDispatchSharedMemoryBytes <= 48 * 1024 ? 16 : 8
    }

    /// LL: whether the update fits in the dispatch kernel's block (ep_ll_update_dispatch: one
    /// launch for update + dispatch): the update's arrays and the dispatch's table in 48 KB.
    var fusesLLUpdate: Bool {
        guard algorithm == .lowLatency else { return false }
        let update = llUpdateUsesBitmaps ? llBitmapUpdateSharedMemoryBytes : updateSharedMemoryBytes(warps: llUpdateWarps)
        return update + fusedDispatchSharedMemoryBytes <= 48 * 1024
    }
}
