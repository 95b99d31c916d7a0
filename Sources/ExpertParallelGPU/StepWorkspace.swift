import ExpertParallel

/// Word offsets of one rank's workspace, mirroring the `WS_*` macros of ep_step.cuh (shared
/// words) and of ep_ll.cu / ep_ht.cu (each algorithm's words after `WS_COUNTS`).
struct StepWorkspace: Sendable {
    let algorithm: Algorithm
    let ranks: Int, localExperts: Int, topK: Int, maxTokens: Int
    var experts: Int { ranks * localExperts }

    init(_ config: GroupConfig) {
        algorithm = config.algorithm
        ranks = config.ranks
        localExperts = config.localExperts
        topK = config.topK
        maxTokens = config.maxTokensPerRank
    }

    static let sequence = 0
    static let status = 1
    var counts: Int { 10 + 3 * ranks }
    private var afterCounts: Int { counts + 2 * ranks * (experts + ranks) }

    /// `[L]` expert counters, `[R]` source counters, `[L][R]`, total; HT adds dropped and `[L]` zone starts.
    var layout: Int {
        switch algorithm {
        case .lowLatency: afterCounts + maxTokens * topK + maxTokens * ranks
        case .highThroughput: afterCounts + maxTokens * topK + maxTokens + maxTokens * topK + maxTokens * ranks
        }
    }
    var layoutWords: Int {
        let common = localExperts + ranks + localExperts * ranks + 1
        return algorithm == .lowLatency ? common : common + 1 + localExperts
    }
    /// HT keeps a second all-gathered table after the layout: the kept counts of the drop policy.
    var words: Int { layout + layoutWords + (algorithm == .highThroughput ? 2 * ranks * (experts + ranks) : 0) }
    var bytes: Int { words * 4 }
}

/// Device status codes of ep_step.cuh (`EP_STATUS_*`).
enum DeviceStatus: UInt32 {
    case ok = 0, indexRange = 1, repeatedExpert = 2, timeout = 3, peerFailed = 4, overflow = 5
}
