import ArgumentParser
import Foundation

/// What the plot reads of one entry of an ep-bench `--json` file (a `Measurement`), decoded on its
/// own so that the run's `--plot` and `ep-bench plot` read the same figures the same way.
struct PlotEntry: Decodable {
    struct Phase: Decodable {
        /// The table's "GB/s/rank" and "floor µs", and the bytes both are computed from.
        var bytesPerRank: Double?
        var floorMicroseconds: Double?
        var gbPerSecond: Double?

        /// The per-rank GB/s the phase would show at its floor: bytes ÷ the floor's time.
        var floorGBs: Double? {
            guard let bytesPerRank, let floorMicroseconds, floorMicroseconds > 0 else { return nil }
            return bytesPerRank / (floorMicroseconds * 1e3)
        }
    }

    struct Tuning: Decodable { var multiprocessors: Int? }

    struct Run: Decodable {
        var commit: String?
        var commitModified: Bool?
        var device: String?
    }

    var name: String
    var device: String?
    var algorithm: String?
    var layout: String?
    var dtype: String?
    var fp8: String?
    var ranks: Int
    var tokens: Int
    var dispatch: Phase
    var combine: Phase?
    var rank: Int?
    var tuning: Tuning?
    var run: Run?

    /// One point of the plot: a case's whole group, or its NCCL ranks' entries together (their mean).
    var pointKey: String {
        [name, algorithm ?? "", layout ?? "", dtype ?? "", fp8 ?? "", "\(ranks)", "\(tokens)", tuning?.multiprocessors.map { "\($0)" } ?? ""]
            .joined(separator: "|")
    }

    static func decode(_ data: Data, from source: String) throws -> [PlotEntry] {
        try decodeList(data, from: source, expected: "an ep-bench --json file (a list of measurements)")
    }
}

/// One row of the Python benchmark's `--json` (python/expert_parallel/bench.py): the plain-tensor
/// baseline's medians per call, in µs. Rows carry no token count; `tokens` is read where present.
struct BaselineRow: Decodable {
    var name: String
    var ranks: Int
    var tokens: Int?
    var baseline: String?
    var dispatchMicroseconds: Double?
    var combineMicroseconds: Double?

    enum CodingKeys: String, CodingKey {
        case name = "case", ranks, tokens, baseline
        case dispatchMicroseconds = "baseline_dispatch_us", combineMicroseconds = "baseline_combine_us"
    }

    static func decode(_ data: Data, from source: String) throws -> [BaselineRow] {
        try decodeList(data, from: source, expected: "a JSON file of python -m expert_parallel.bench (a list of rows)")
    }
}

/// `data` as a JSON list of `Element`, or an error that names `source`, what it should have been
/// and where its decoding failed.
func decodeList<Element: Decodable>(_ data: Data, from source: String, expected: String) throws -> [Element] {
    do {
        return try JSONDecoder().decode([Element].self, from: data)
    } catch {
        throw ValidationError("\(source) is not \(expected): \(misfit(data, as: Element.self) ?? describeDecoding(error))")
    }
}

/// Where valid JSON failed to decode without a path (Foundation's decoder reports a number that
/// does not fit its field, such as 4.5, 1e30 or 2^64 for a whole number, as "not valid JSON" of
/// the top level): the first list element that does not decode alone, named; nil for anything
/// else (not JSON, not a list, or an error that has its path).
func misfit<Element: Decodable>(_ data: Data, as: Element.Type) -> String? {
    guard let list = try? JSONSerialization.jsonObject(with: data) as? [Any] else { return nil }
    for (i, element) in list.enumerated() {
        guard let one = try? JSONSerialization.data(withJSONObject: [element]) else { continue }
        do {
            _ = try JSONDecoder().decode([Element].self, from: one)
        } catch let DecodingError.dataCorrupted(context) where context.codingPath.count <= 1 {
            return "[\(i)]: a number that does not fit its field (a whole-number field holding a fraction, an exponent or a value past 64 bits)"
        } catch {
            return nil   // (an error with its path: describeDecoding names it)
        }
    }
    return nil
}

/// A decoding error in a line: what was wrong and where.
func describeDecoding(_ error: Error) -> String {
    func path(_ keys: [CodingKey]) -> String {
        keys.isEmpty ? "the top level" : keys.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
    }
    switch error as? DecodingError {
    case let .keyNotFound(key, context)?: return "\(path(context.codingPath + [key])) is missing"
    case let .typeMismatch(_, context)?, let .valueNotFound(_, context)?: return "\(path(context.codingPath)): \(context.debugDescription)"
    case let .dataCorrupted(context)?: return "\(path(context.codingPath)): \(context.debugDescription)"
    default: return "\(error)"
    }
}

/// The plot's series: per-rank GB/s against tokens per rank.
struct PlotSeries {
    enum Kind { case library, floor, baseline }
    var label: String
    var phase: String
    var kind: Kind
    var points: [(x: Double, y: Double)]
}

extension Plot {
    /// This library's dispatch and combine (the table's GB/s/rank), their floors (bytes ÷ floor µs),
    /// and, with `baseline`, the plain-PyTorch baseline's medians at the library's bytes of the
    /// same case and ranks. A usage error when nothing can be drawn.
    init(engine: [PlotEntry], baseline: [BaselineRow]? = nil) throws {
        guard !engine.isEmpty else { throw ValidationError("nothing to plot: the ep-bench results are an empty list") }
        // Group a case's NCCL rank entries into one point (a whole group's entry is alone in its group).
        var keys: [String] = [], groups: [String: [PlotEntry]] = [:]
        for entry in engine {
            if groups[entry.pointKey] == nil { keys.append(entry.pointKey) }
            groups[entry.pointKey, default: []].append(entry)
        }
        func mean(_ values: [Double?]) -> Double? {
            let known = values.compactMap { $0 }
            return known.isEmpty || known.count != values.count ? nil : known.reduce(0, +) / Double(known.count)
        }
        var series: [PlotSeries] = []
        for (phase, select) in [("dispatch", { (e: PlotEntry) in e.dispatch } as (PlotEntry) -> PlotEntry.Phase?),
                                ("combine", { (e: PlotEntry) in e.combine })] {
            var measured: [(x: Double, y: Double)] = [], floors: [(x: Double, y: Double)] = []
            for key in keys {
                let group = groups[key]!
                let phases = group.compactMap(select)
                guard phases.count == group.count, phases.allSatisfy({ $0.bytesPerRank != nil }) else { continue }
                let x = Double(group[0].tokens)
                if let y = mean(phases.map(\.gbPerSecond)) { measured.append((x, y)) }
                if let y = mean(phases.map(\.floorGBs)) { floors.append((x, y)) }
            }
            if !measured.isEmpty { series.append(PlotSeries(label: "ExpertParallel \(phase)", phase: phase, kind: .library, points: measured)) }
            if !floors.isEmpty { series.append(PlotSeries(label: "floor \(phase)", phase: phase, kind: .floor, points: floors)) }
        }
        if let baseline { series += try Self.baselineSeries(baseline, engine: engine) }
        guard !series.isEmpty else { throw ValidationError("nothing to plot: no entry has dispatch or combine bytes") }
        self.series = series.map { s in var s = s; s.points.sort { $0.x < $1.x }; return s }

        let devices = engine.map { $0.run?.device ?? $0.device }.compactMap { $0 }
        var seen: [String] = []
        for device in devices where !seen.contains(device) { seen.append(device) }
        var title = "Per-rank GB/s against tokens per rank"
        if !seen.isEmpty { title += " on \(seen.joined(separator: ", "))" }
        if let run = engine.first?.run, let commit = run.commit {
            title += ", commit \(commit.prefix(12))" + (run.commitModified == true ? " (modified)" : "")
        }
        self.title = title
    }

    /// The baseline's dispatch and combine as per-rank GB/s: the bytes of the library's entry of
    /// the same case, ranks and tokens (rows without tokens: the standard case's, or the only
    /// count the library ran that case at) over the baseline's median µs.
    static func baselineSeries(_ rows: [BaselineRow], engine: [PlotEntry]) throws -> [PlotSeries] {
        // The Python bench compares against entries with a combine and without FP8 (its _engine_figures).
        let comparable = engine.filter { $0.combine != nil && $0.fp8 == nil }
        var dispatch: [(x: Double, y: Double)] = [], combine: [(x: Double, y: Double)] = [], names: [String] = []
        var missed: [String] = []
        for row in rows where row.dispatchMicroseconds != nil || row.combineMicroseconds != nil {
            let same = comparable.filter { $0.name == row.name && $0.ranks == row.ranks }
            let counts = Set(same.map(\.tokens))
            let tokens = row.tokens ?? BenchCase.standard.first { $0.name == row.name }?.tokens ?? (counts.count == 1 ? counts.first : nil)
            let matched = same.filter { $0.tokens == tokens }
            guard let tokens, !matched.isEmpty else {
                missed.append("\(row.name) R=\(row.ranks)" + (row.tokens.map { " B=\($0)" } ?? ""))
                continue
            }
            func bytes(_ phase: (PlotEntry) -> PlotEntry.Phase?) -> Double? {
                let values = matched.compactMap { phase($0)?.bytesPerRank }
                return values.count == matched.count ? values.reduce(0, +) / Double(values.count) : nil
            }
            if let us = row.dispatchMicroseconds, us > 0, let b = bytes({ $0.dispatch }) { dispatch.append((Double(tokens), b / (us * 1e3))) }
            if let us = row.combineMicroseconds, us > 0, let b = bytes({ $0.combine }) { combine.append((Double(tokens), b / (us * 1e3))) }
            if let name = row.baseline, !names.contains(name) { names.append(name) }
        }
        if !missed.isEmpty {
            FileHandle.standardError.write(Data("--baseline: no ep-bench entry of the same case, ranks and tokens for \(missed.joined(separator: ", ")); left out\n".utf8))
        }
        guard !dispatch.isEmpty || !combine.isEmpty else {
            throw ValidationError("--baseline: none of its rows matches an entry of the ep-bench results (same case, ranks and tokens, with a combine, without FP8)")
        }
        let name = names.isEmpty ? "baseline" : names.joined(separator: "/")
        return [("dispatch", dispatch), ("combine", combine)].filter { !$0.1.isEmpty }
            .map { PlotSeries(label: "\(name) \($0.0)", phase: $0.0, kind: .baseline, points: $0.1) }
    }
}
