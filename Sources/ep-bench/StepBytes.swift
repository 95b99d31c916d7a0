import ExpertParallel

/// Rows dispatch and combine must read and write across all ranks (BENCHMARK.md, "The floor on one GPU").
struct StepBytes: Sendable {
    /// Dispatch reads the source rows once and writes every received row; combine is the mirror.
    var sourceRows: Int
    var receivedRows: Int
    /// Per-rank payload as BENCHMARK.md counts it (LL: selections; HT: (token, rank) pairs).
    var countedRowsPerRank: [Int]
    var rowBytes: Int

    /// The floor of dispatch, and of combine (the same bytes the other way); a step's is both.
    var floorBytes: Int { (sourceRows + receivedRows) * rowBytes }

    init(config: GroupConfig, routings: [RoutingTable]) {
        rowBytes = config.rowBytes
        sourceRows = routings.reduce(0) { $0 + $1.tokens }
        let l = config.localExperts
        var received = 0
        countedRowsPerRank = routings.map { routing in
            let selections = routing.experts.filter { $0 >= 0 }.count
            var pairs = 0
            for t in 0..<routing.tokens {
                pairs += Set((0..<routing.topK).compactMap { routing[t, $0] >= 0 ? routing[t, $0] / l : nil }).count
            }
            let perLayout = (config.layout == .expertMajor || config.isExpertMajorHT) ? selections : pairs
            received += perLayout
            return config.algorithm == .lowLatency ? selections : pairs
        }
        receivedRows = received
    }
}
