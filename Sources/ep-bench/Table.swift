import Foundation

/// The terminal table: one row per (case, phase), the step last, then what the step row means.
enum Table {
    static let header = ["case", "algo/layout", "dtype", "R", "B", "SMs", "phase", "median µs", "min µs", "max µs",
                         "graph µs", "GB/s/rank", "floor µs", "% floor", "valid", "note"]

    static let legend = """
        step: update + dispatch + combine read as one sequence per iteration (its median, not the sum of the \
        phases' medians; GPU, virtual ranks: events around the step only, none between its calls, whose reading \
        with them the note gives); its floor is the dispatch floor plus the combine floor. upd+disp: update and dispatch \
        in one call, one launch (LL on the GPU); where it is shown, the step is that call + combine. graph: µs per \
        call with the calls replayed from one CUDA graph, no event between them (GPU, virtual ranks).
        """

    static func render(_ results: [Measurement]) -> String {
        var rows = [header]
        for m in results {
            let name = m.rank.map { "\(m.name) r\($0)" } ?? m.name
            let sms = m.tuning.map { "\($0.multiprocessors)" } ?? "-"
            let lead = [name, "\(m.algorithm) \(m.layout)", m.dtypeName, "\(m.ranks)", tokens(m), sms]
            let valid = m.validated ? "yes" : "NO"
            rows.append(lead + ["update"] + timings(m.update) + ["", "", "", "", ""])
            rows.append(lead + ["dispatch"] + timings(m.dispatch) + floors(m.dispatch) + [valid, ""])
            if let fused = m.updateDispatch {
                rows.append(lead + ["upd+disp"] + timings(fused) + floors(fused) + [valid, "one launch"])
            }
            if let combine = m.combine {
                rows.append(lead + ["combine"] + timings(combine) + floors(combine) + [valid, ""])
            } else {
                rows.append(lead + ["combine"] + Array(repeating: "-", count: 7) + ["", "skipped: \(m.combineSkipped ?? "")"])
            }
            let phased = m.stepWithPhaseEvents.map { "with events between its calls: \(figure($0.median))" }
            rows.append(lead + ["step"] + timings(m.step) + floors(m.step) + [valid, m.step.note ?? phased ?? ""])
        }
        let widths = (0..<header.count).map { c in rows.map { $0[c].count }.max()! }
        let table = rows.map { row in
            zip(row, widths).map { cell, width in cell.padding(toLength: width, withPad: " ", startingAt: 0) }
                .joined(separator: "  ").trimmingCharacters(in: .whitespaces)
        }
        let sized = results.contains { tokens($0) != "\($0.tokens)" } ? [groupLegend] : []
        return (table + [legend] + sized).joined(separator: "\n")
    }

    static let groupLegend = "B (max M): each step dispatches B tokens per rank in groups sized for M (--max-tokens); bytes and floors count the B tokens."

    /// The B column: the step's tokens per rank, and the group's maximum where --max-tokens made it another.
    static func tokens(_ m: Measurement) -> String {
        guard let most = m.maxTokensPerRank, most != m.tokens else { return "\(m.tokens)" }
        return "\(m.tokens) (max \(most))"
    }

    private static func timings(_ phase: PhaseStats) -> [String] {
        [figure(phase.median), figure(phase.minimum), figure(phase.maximum), phase.graphMicroseconds.map(figure) ?? ""]
    }

    /// One decimal from 100 up, three significant digits below (tiny cases stay readable).
    static func figure(_ value: Double) -> String {
        abs(value) >= 100 || value == 0 ? format(value, 1) : String(format: "%.3g", value)
    }

    private static func floors(_ phase: PhaseStats) -> [String] {
        [phase.gbPerSecond, phase.floorMicroseconds, phase.percentOfFloor].map { $0.map(figure) ?? "" }
    }
}
