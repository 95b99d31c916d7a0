import ExpertParallel

extension GroupConfig {
    /// The bounds of the GPU backend on top of `validated()`: ranks fit the kernels' 32-bit
    /// destination masks and lanes, and the update kernel's static shared memory fits 48 KB.
    package func validatedForGPU() throws(EPError) -> Self {
        let config = try validated()
        guard ranks <= 32 else {
            throw .invalidConfig(field: "ranks", value: "\(ranks)", requirement: "must be ≤ 32 on the GPU backend")
        }
        guard experts <= 1024 else {
            throw .invalidConfig(field: "experts", value: "\(experts)", requirement: "must be ≤ 1024 on the GPU backend")
        }
        let bytes = updateSharedMemoryBytes
        guard bytes <= 48 * 1024 else {
            throw .invalidConfig(
                field: "maxTokensPerRank", value: "\(maxTokensPerRank)",
                requirement: "with topK \(topK), \(experts) experts and \(ranks) ranks the update kernel needs \(bytes) bytes of shared memory; at most 49152")
        }
        return config
    }

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

    /// LL: warps whose per-warp counts the update keeps (EP_UPDATE_WARPS): 16 (the fused kernel's
    /// whole block, half the serial passes of 8) where they fit beside the dispatch's table, else 8.
    var llUpdateWarps: Int {
        updateSharedMemoryBytes(warps: 16) + fusedDispatchSharedMemoryBytes <= 48 * 1024 ? 16 : 8
    }

    /// LL: whether the update fits in the dispatch kernel's block (ep_ll_update_dispatch: one
    /// launch for update + dispatch): the update's arrays and the dispatch's table in 48 KB.
    var fusesLLUpdate: Bool {
        algorithm == .lowLatency && updateSharedMemoryBytes(warps: llUpdateWarps) + fusedDispatchSharedMemoryBytes <= 48 * 1024
    }
}
