/// Timings of one phase over the measured iterations, in microseconds.
struct PhaseStats: Codable, Sendable {
    var minimum: Double
    var median: Double
    var maximum: Double

    init(_ samples: [Double]) {
        let sorted = samples.sorted()
        minimum = sorted.first ?? 0
        maximum = sorted.last ?? 0
        median = sorted.isEmpty ? 0 : sorted.count % 2 == 1
            ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
    }
}

/// One case's result, as printed and as written by `--json`.
struct Measurement: Codable, Sendable {
    var name: String
    var backend: String
    var device: String
    var algorithm: String
    var layout: String
    var ranks: Int
    var tokens: Int
    var hidden: Int
    var topK: Int
    var experts: Int
    var iterations: Int
    var update: PhaseStats
    var dispatch: PhaseStats
    var combine: PhaseStats
    /// Mean over ranks of the bytes BENCHMARK.md counts per rank.
    var bytesPerRank: Double
    /// Bytes read plus written by the whole step, and the copy bandwidth measured in this run.
    var floorBytes: Double
    var copyBandwidthGBs: Double
    var validated: Bool
    /// The rank that measured this (NCCL ranks: one process each); nil for a whole group.
    var rank: Int? = nil

    var floorMicroseconds: Double { floorBytes / (copyBandwidthGBs * 1e3) }
    func gbPerSecond(_ phase: PhaseStats) -> Double { phase.median > 0 ? bytesPerRank / (phase.median * 1e3) : 0 }
    func percentOfFloor(_ phase: PhaseStats) -> Double { phase.median > 0 ? 100 * floorMicroseconds / phase.median : 0 }
}
