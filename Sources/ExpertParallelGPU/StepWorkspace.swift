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

    /// The error that rank `rank`'s status words `[code, a, b, c]` record, or nil for none.
    static func error(_ words: [UInt32], rank: Int, config: GroupConfig) -> EPError? {
        switch DeviceStatus(rawValue: words[0]) {
        case .ok?: nil
        case .indexRange?:
            .invalidArgument(
                field: "topkIdx[rank \(rank)][\(words[1])][\(words[2])]", value: "\(Int32(bitPattern: words[3]))",
                requirement: "must be -1 or in [0, \(config.experts))")
        case .repeatedExpert?:
            .repeatedExpert(token: Int(words[1]), firstColumn: Int(words[2]), secondColumn: Int(words[3]), expert: -1)
        case .timeout?:
            .timeout(rank: rank, missing: [Int(words[1])])
        case .overflow?:
            .overflow(rank: Int(words[1]), required: Int(words[2]), capacity: Int(words[3]))
        case .peerFailed?:
            .peerFailed(rank: rank, peer: Int(words[1]), reason: "its topkIdx was invalid")
        case nil:
            .backend("rank \(rank): unknown device status \(words[0])")
        }
    }
}

extension StepWorkspace {
    /// The layout words of a rank's workspace as `LayoutInfo`.
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
