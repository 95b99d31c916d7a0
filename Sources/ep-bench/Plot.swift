import Foundation

/// `--plot` and `ep-bench plot`: per-rank GB/s (y) against tokens per rank (x; log2 when the
/// tokens span more than a factor 4) as a self-contained SVG. Each series is one `<polyline>`
/// (class `series`, `data-series` its label) with a marker per point; the floors are dashed.
struct Plot {
    var title: String
    var series: [PlotSeries]

    static let width = 800.0, height = 480.0
    /// The plotting area; the legend sits to its right.
    static let left = 80.0, right = 560.0, top = 60.0, bottom = 410.0

    /// A log2 x axis when the largest token count is more than 4 times the smallest.
    var logX: Bool {
        let xs = series.flatMap { $0.points.map(\.x) }
        guard let low = xs.min(), let high = xs.max(), low > 0 else { return false }
        return high / low > 4
    }

    func svg() -> String {
        let xs = series.flatMap { $0.points.map(\.x) }, ys = series.flatMap { $0.points.map(\.y) }
        let logX = self.logX
        // x: powers of two on a log axis, else round numbers from 0; y: round numbers from 0.
        let xTicks: [Double], xRange: ClosedRange<Double>
        if logX {
            let low = log2(xs.min()!).rounded(.down), high = log2(xs.max()!).rounded(.up)
            let step = max(1, ((high - low) / 10).rounded(.up))
            xTicks = stride(from: low, through: high, by: step).map { pow(2, $0) }
            xRange = (low - 0.25)...(high + 0.25)
        } else {
            xTicks = Self.ticks(upTo: xs.max()!, minimumStep: 1)   // whole tokens
            xRange = 0...xTicks.last!
        }
        let yTicks = Self.ticks(upTo: ys.max()!)
        let yRange = 0...yTicks.last!
        func px(_ x: Double) -> Double {
            let v = logX ? log2(x) : x
            return Self.left + (v - xRange.lowerBound) / (xRange.upperBound - xRange.lowerBound) * (Self.right - Self.left)
        }
        func py(_ y: Double) -> Double { Self.bottom - (y - yRange.lowerBound) / (yRange.upperBound - yRange.lowerBound) * (Self.bottom - Self.top) }

        var out = [
            #"<?xml version="1.0" encoding="UTF-8"?>"#,
            #"<svg xmlns="http://www.w3.org/2000/svg" width="\#(n(Self.width))" height="\#(n(Self.height))" viewBox="0 0 \#(n(Self.width)) \#(n(Self.height))" font-family="sans-serif" font-size="12">"#,
            #"<title>\#(escape(title))</title>"#,
            #"<rect width="100%" height="100%" fill="white"/>"#,
            #"<text class="title" x="\#(n(Self.width / 2))" y="28" text-anchor="middle" font-size="15">\#(escape(title))</text>"#,
        ]
        // Grid, ticks and their labels.
        out.append(#"<g class="axes" stroke="black">"#)
        for tick in xTicks {
            let x = px(tick)
            out.append(#"<line x1="\#(n(x))" y1="\#(n(Self.top))" x2="\#(n(x))" y2="\#(n(Self.bottom))" stroke="gainsboro"/>"#)
            out.append(#"<line x1="\#(n(x))" y1="\#(n(Self.bottom))" x2="\#(n(x))" y2="\#(n(Self.bottom + 5))"/>"#)
            out.append(#"<text class="xtick" x="\#(n(x))" y="\#(n(Self.bottom + 19))" text-anchor="middle" stroke="none">\#(Self.label(tick))</text>"#)
        }
        for tick in yTicks {
            let y = py(tick)
            out.append(#"<line x1="\#(n(Self.left))" y1="\#(n(y))" x2="\#(n(Self.right))" y2="\#(n(y))" stroke="gainsboro"/>"#)
            out.append(#"<line x1="\#(n(Self.left - 5))" y1="\#(n(y))" x2="\#(n(Self.left))" y2="\#(n(y))"/>"#)
            out.append(#"<text class="ytick" x="\#(n(Self.left - 8))" y="\#(n(y + 4))" text-anchor="end" stroke="none">\#(Self.label(tick))</text>"#)
        }
        out.append(#"<line x1="\#(n(Self.left))" y1="\#(n(Self.bottom))" x2="\#(n(Self.right))" y2="\#(n(Self.bottom))"/>"#)
        out.append(#"<line x1="\#(n(Self.left))" y1="\#(n(Self.top))" x2="\#(n(Self.left))" y2="\#(n(Self.bottom))"/>"#)
        out.append("</g>")
        let xLabel = logX ? "tokens per rank (log2 scale)" : "tokens per rank"
        out.append(#"<text class="xlabel" x="\#(n((Self.left + Self.right) / 2))" y="\#(n(Self.bottom + 42))" text-anchor="middle">\#(xLabel)</text>"#)
        let midY = (Self.top + Self.bottom) / 2
        out.append(#"<text class="ylabel" x="22" y="\#(n(midY))" text-anchor="middle" transform="rotate(-90 22 \#(n(midY)))">GB/s per rank</text>"#)

        // The series, then the legend.
        for (index, s) in series.enumerated() {
            let style = Self.style(s, index)
            let points = s.points.map { "\(n(px($0.x))),\(n(py($0.y)))" }.joined(separator: " ")
            out.append(#"<g class="\#(Self.kindName(s.kind))" data-series="\#(escape(s.label))">"#)
            out.append(#"<polyline class="series" data-series="\#(escape(s.label))" points="\#(points)" fill="none" stroke="\#(style.color)" stroke-width="\#(style.width)"\#(style.dash)/>"#)
            for p in s.points { out.append(marker(s.kind, px(p.x), py(p.y), style.color, detail: "\(s.label): \(Self.label(p.x)) tokens, \(format(p.y, 3)) GB/s")) }
            out.append("</g>")
        }
        out.append(#"<g class="legend">"#)
        for (index, s) in series.enumerated() {
            let style = Self.style(s, index), y = Self.top + 10 + Double(index) * 22, x = Self.right + 24
            out.append(#"<line x1="\#(n(x))" y1="\#(n(y))" x2="\#(n(x + 28))" y2="\#(n(y))" stroke="\#(style.color)" stroke-width="\#(style.width)"\#(style.dash)/>"#)
            out.append(marker(s.kind, x + 14, y, style.color, detail: nil))
            out.append(#"<text x="\#(n(x + 36))" y="\#(n(y + 4))">\#(escape(s.label))</text>"#)
        }
        out.append("</g>")
        out.append("</svg>")
        return out.joined(separator: "\n") + "\n"
    }

    /// Dispatch blue, combine red; the floor dashed in the same colour; the baseline green/orange, dotted.
    private static func style(_ s: PlotSeries, _ index: Int) -> (color: String, width: String, dash: String) {
        let dispatch = s.phase == "dispatch"
        switch s.kind {
        case .library: return (dispatch ? "#1f77b4" : "#d62728", "2", "")
        case .floor: return (dispatch ? "#1f77b4" : "#d62728", "1.5", #" stroke-dasharray="7 4""#)
        case .baseline: return (dispatch ? "#2ca02c" : "#ff7f0e", "2", #" stroke-dasharray="2 3""#)
        }
    }

    private static func kindName(_ kind: PlotSeries.Kind) -> String {
        switch kind {
        case .library: "library"
        case .floor: "floor"
        case .baseline: "baseline"
        }
    }

    /// A filled circle (the library), a short bar (the floor) or a square (the baseline).
    private func marker(_ kind: PlotSeries.Kind, _ x: Double, _ y: Double, _ color: String, detail: String?) -> String {
        let tip = detail.map { "<title>\(escape($0))</title>" } ?? ""
        switch kind {
        case .library:
            return #"<circle class="point" cx="\#(n(x))" cy="\#(n(y))" r="3.5" fill="\#(color)">\#(tip)</circle>"#
        case .floor:
            return #"<rect class="point" x="\#(n(x - 6))" y="\#(n(y - 1.5))" width="12" height="3" fill="\#(color)">\#(tip)</rect>"#
        case .baseline:
            return #"<rect class="point" x="\#(n(x - 3.5))" y="\#(n(y - 3.5))" width="7" height="7" fill="\#(color)">\#(tip)</rect>"#
        }
    }

    /// Round ticks from 0 up to at least `high`: steps of 1, 2 or 5 × 10ⁿ, about five of them.
    static func ticks(upTo high: Double, minimumStep: Double = 0) -> [Double] {
        guard high > 0, high.isFinite else { return [0, 1] }
        let raw = high / 5, magnitude = pow(10, log10(raw).rounded(.down))
        let step = max(minimumStep, [1.0, 2, 5, 10].map { $0 * magnitude }.first { $0 >= raw } ?? 10 * magnitude)
        // A value within a few subnormals of 0 (a --json's GB/s of 1e-323): its fifth, or the power
        // of ten below it, underflows to 0, and no step of 0 counts up to it. One tick at the value.
        guard step > 0 else { return [0, high] }
        let count = Int((high / step).rounded(.up))
        return (0...max(count, 1)).map { Double($0) * step }
    }

    /// A tick label: an integer as is, else up to three significant digits.
    static func label(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int(value)) : String(format: "%.3g", value)
    }
}

/// A coordinate with two decimals, trailing zeros dropped.
private func n(_ value: Double) -> String {
    var s = String(format: "%.2f", value)
    while s.hasSuffix("0") { s.removeLast() }
    if s.hasSuffix(".") { s.removeLast() }
    return s
}

/// Text and attribute values as XML allows them.
func escape(_ text: String) -> String {
    var out = ""
    for c in text {
        switch c {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&apos;"
        // XML 1.0 has no other control characters, not even escaped.
        case _ where c.unicodeScalars.contains { $0.value < 0x20 || (0xFFFE...0xFFFF).contains($0.value) }: out += " "
        default: out.append(c)
        }
    }
    return out
}
