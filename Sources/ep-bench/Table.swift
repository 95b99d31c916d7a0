import Foundation

/// The terminal table: one row per (case, phase).
enum Table {
    static func render(_ results: [Measurement]) -> String {
        var rows: [[String]] = [["case", "algo/layout", "R", "B", "phase", "median µs", "min µs", "max µs", "GB/s/rank", "floor µs", "% floor", "valid"]]
        for m in results {
            let name = m.rank.map { "\(m.name) r\($0)" } ?? m.name
            rows.append([name, "\(m.algorithm) \(m.layout)", "\(m.ranks)", "\(m.tokens)", "update",
                         format(m.update.median, 1), format(m.update.minimum, 1), format(m.update.maximum, 1), "", "", "", ""])
            for (phaseName, phase) in [("dispatch", m.dispatch), ("combine", m.combine)] {
                rows.append([name, "\(m.algorithm) \(m.layout)", "\(m.ranks)", "\(m.tokens)", phaseName,
                             format(phase.median, 1), format(phase.minimum, 1), format(phase.maximum, 1),
                             format(m.gbPerSecond(phase), 1), format(m.floorMicroseconds, 1),
                             format(m.percentOfFloor(phase), 1), m.validated ? "yes" : "NO"])
            }
        }
        let widths = (0..<rows[0].count).map { c in rows.map { $0[c].count }.max()! }
        return rows.map { row in
            zip(row, widths).map { cell, width in cell.padding(toLength: width, withPad: " ", startingAt: 0) }.joined(separator: "  ")
        }.joined(separator: "\n")
    }
}
