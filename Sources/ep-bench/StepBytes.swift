import ExpertParallel

/// Rows dispatch and combine must read and write across all ranks (docs/ep-bench.md, "Standard
/// cases, bytes and the floor").
struct StepBytes: Sendable {
    /// Dispatch reads the source rows once and writes every received row; combine is the mirror.
    var sourceRows: Int
    var receivedRows: Int
    /// Per-rank payload as the standard counting takes it (LL: selections; HT: (token, rank) pairs).
    var countedRowsPerRank: [Int]
    /// Bytes of a row in the element type (combine's rows, and dispatch's without FP8).
    var rowBytes: Int
    /// Bytes of a row as dispatch moves it: `rowBytes`, or with FP8 the e4m3 codes plus the
    /// row's scale words, hidden × 1 + scale words × 4.
    var wireRowBytes: Int
    /// Bytes of a source row as dispatch reads it: the element type, or (FP8 pass-through) the wire row.
    var sourceRowBytes: Int

    /// The floor of dispatch: the source rows read, every received row written (as moved).
    var dispatchFloorBytes: Int { sourceRows * sourceRowBytes + receivedRows * wireRowBytes }
    /// The floor of combine: the mirror of a plain dispatch, in the element type.
    var combineFloorBytes: Int { (sourceRows + receivedRows) * rowBytes }

    init(config: GroupConfig, routings: [RoutingTable]) {
        rowBytes = config.rowBytes
        if let format = config.fp8Format {
            wireRowBytes = config.hidden * DataType.e4m3.byteSize + format.scaleWordsPerRow * 4
            // Quantise reads the caller's rows in the element type; pass-through reads the wire rows.
            sourceRowBytes = config.fp8?.source == .passThrough ? wireRowBytes : rowBytes
        } else {
            wireRowBytes = rowBytes
            sourceRowBytes = rowBytes
        }
        sourceRows = routings.reduce(0) { $0 + $1.tokens }
        let l = config.localExperts
        var received = 0
        countedRowsPerRank = routings.map { routing in
            let selections = routing.experts.filter { $0 >= 0 }.count
            var pairs = 0
            for t in 0..<routing.tokens {
                pairs += Set((0..<routing.topK).compactMap { routing.expert(t, $0) >= 0 ? routing.expert(t, $0) / l : nil }).count
            }
            let perLayout = (config.layout == .expertMajor || config.isExpertMajorHT) ? selections : pairs
            received += perLayout
            return config.algorithm == .lowLatency ? selections : pairs
        }
        receivedRows = received
    }
}
