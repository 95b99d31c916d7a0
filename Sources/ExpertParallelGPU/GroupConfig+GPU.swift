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

    /// Static shared memory of the update kernel, counted from its arrays (ep_ll.cu, ep_ht.cu).
    var updateSharedMemoryBytes: Int {
        let e = experts, r = ranks
        let words = switch algorithm {
        // counts[8][E + R], routing[Bmax * K], destinations[Bmax], two flags.
        case .lowLatency: 8 * (e + r) + maxTokensPerRank * (topK + 1) + 2
        // counts[16][E + R], zone_start[E], required[R], before[E + R], flags; the drop policy adds
        // kept_tokens[R], kept_counts[E + R] and zone_count[L].
        case .highThroughput: 18 * (e + r) + 4 + (overflow == .drop ? e + 2 * r + localExperts : 0)
        }
        return words * 4
    }
}
