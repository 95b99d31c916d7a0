/// Word offsets of one rank's LL workspace, mirroring the `WS_*` macros of `ep_ll.cu`.
struct LLWorkspace: Sendable {
    let ranks: Int, localExperts: Int, topK: Int, maxTokens: Int
    var experts: Int { ranks * localExperts }

    static let sequence = 0
    static let status = 1
    static let stepValid = 5
    var countFlags: Int { 10 }
    var counts: Int { 10 + 3 * ranks }
    var selectionRows: Int { counts + 2 * ranks * (experts + ranks) }
    var pairRows: Int { selectionRows + maxTokens * topK }
    var layout: Int { pairRows + maxTokens * ranks }
    var words: Int { layout + localExperts + ranks + localExperts * ranks + 1 }
    var bytes: Int { words * 4 }
}

/// Device status codes of `ep_ll.cu` (`EP_STATUS_*`).
enum DeviceStatus: UInt32 {
    case ok = 0, indexRange = 1, repeatedExpert = 2, timeout = 3, peerFailed = 4
}
