import ExpertParallel
import Foundation
import Testing

/// Comparisons of a harness's tensors with the reference. Each returns a list of mismatches
/// (empty when everything matches), so that a failing property case reports a few precise lines
/// instead of thousands.
enum Verify {
    /// The `tokens` output of destination `d`: every row is the expected token row byte for
    /// byte, zero padding, or the caller's poison where nothing may be written.
    static func receivedRows(_ h: StepHarness, _ ref: Reference, rank d: Int) -> [String] {
        let expected = ref.receive(on: d).rows
        let rowBytes = h.config.rowBytes
        let poisonRow = [UInt8](repeating: StepHarness.poison, count: rowBytes)
        let zeroRow = [UInt8](repeating: 0, count: rowBytes)
        var problems: [String] = []
        let base = h.received[d].storage
        for (row, content) in expected.enumerated() {
            let actual = base + row * rowBytes
            let same: Bool
            switch content {
            case .untouched: same = poisonRow.withUnsafeBytes { memcmp(actual, $0.baseAddress!, rowBytes) == 0 }
            case .zero: same = zeroRow.withUnsafeBytes { memcmp(actual, $0.baseAddress!, rowBytes) == 0 }
            case let .token(s, t):
                same = h.scenario.tokens[s].withUnsafeBytes { memcmp(actual, $0.baseAddress! + t * rowBytes, rowBytes) == 0 }
            }
            if !same {
                let found = Array(UnsafeRawBufferPointer(start: actual, count: min(rowBytes, 16)))
                problems.append("rank \(d) row \(row): expected \(content), found bytes \(found)\(rowBytes > 16 ? "…" : "")")
                if problems.count >= 8 { break }
            }
        }
        return problems
    }

    /// The `topkIdx` and `topkWeights` outputs of destination `d` (layouts that have them).
    static func receivedRouting(_ h: StepHarness, _ ref: Reference, rank d: Int) -> [String] {
        guard let idx = h.receivedIdx[d], let weights = h.receivedWeights[d] else { return [] }
        let expected = ref.receive(on: d)
        let perRow = h.config.receiveRoutingShape!.count == 1 ? 1 : h.config.topK
        let rows = idx.elementCount / perRow
        let poisonIndex: Int = idx.dtype == .i32
            ? Int(Int32(bitPattern: 0xA5A5_A5A5))
            : Int(Int64(bitPattern: 0xA5A5_A5A5_A5A5_A5A5))
        let poisonWeight = Float(bitPattern: 0xA5A5_A5A5)
        var problems: [String] = []
        for row in 0..<rows {
            let wantIndex = expected.index[row] ?? Array(repeating: poisonIndex, count: perRow)
            let wantWeight = expected.weight[row] ?? Array(repeating: poisonWeight, count: perRow)
            let gotIndex = (0..<perRow).map { c in
                idx.dtype == .i32 ? Int(idx[as: Int32.self, row * perRow + c]) : Int(idx[as: Int64.self, row * perRow + c])
            }
            let gotWeight = (0..<perRow).map { weights[as: Float.self, row * perRow + $0] }
            if gotIndex != wantIndex {
                problems.append("rank \(d) topkIdx row \(row): expected \(wantIndex), found \(gotIndex)")
            }
            if gotWeight.map(\.bitPattern) != wantWeight.map(\.bitPattern) {
                problems.append("rank \(d) topkWeights row \(row): expected \(wantWeight), found \(gotWeight)")
            }
            if problems.count >= 8 { break }
        }
        return problems
    }

    static func info(_ actual: LayoutInfo, _ ref: Reference, rank d: Int) -> [String] {
        let expected = ref.receive(on: d).info
        let found = ExpectedInfo(actual)
        return found == expected ? [] : ["rank \(d) layout info:\n  expected \(expected)\n  found    \(found)"]
    }

    /// The combine output of source `s`, bit for bit.
    static func combined(_ h: StepHarness, _ ref: Reference, rank s: Int, _ direction: PassDirection) -> [String] {
        let expected = ref.combined(s, direction)
        let actual = h.combined[s].bytes()
        guard expected != actual else { return [] }
        let rowBytes = h.config.rowBytes, type = h.config.elementType
        let firstByte = expected.indices.first { expected[$0] != actual[$0] } ?? 0
        let t = firstByte / rowBytes, element = (firstByte % rowBytes) / type.byteSize
        let want = ReferenceArithmetic.decodeRow(expected[t * rowBytes..<(t + 1) * rowBytes], h.config.hidden, type)[element]
        let got = ReferenceArithmetic.decodeRow(actual[t * rowBytes..<(t + 1) * rowBytes], h.config.hidden, type)[element]
        return ["rank \(s) combined token \(t) element \(element): expected \(want), found \(got)"]
    }

    /// Backward HT: the weight gradients of source `s`, bit for bit.
    static func weightGradients(_ h: StepHarness, _ ref: Reference, rank s: Int) -> [String] {
        let expected = ref.weightGradients(s)
        let actual: [Float]
        do { actual = try h.combinedWeightGradients[s]!.array(of: Float.self) } catch { return ["rank \(s) weight gradients: \(error)"] }
        guard expected.map(\.bitPattern) != actual.map(\.bitPattern) else { return [] }
        let i = expected.indices.first { expected[$0].bitPattern != actual[$0].bitPattern }!
        return ["rank \(s) weight gradient of token \(i / h.config.topK) column \(i % h.config.topK): expected \(expected[i]), found \(actual[i])"]
    }

    /// Every output of `rank` still holds the poison byte.
    static func untouched(_ h: StepHarness, rank: Int) -> [String] {
        h.outputTensors(of: rank).compactMap { name, tensor in
            tensor.bytes().allSatisfy { $0 == StepHarness.poison } ? nil : "rank \(rank) \(name) was written"
        }
    }
}

/// Records one issue listing the mismatches, with the scenario that produced them.
func expectMatch(_ problems: [String], _ scenario: Scenario, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(problems.isEmpty, "\(problems.prefix(8).joined(separator: "\n"))\nscenario: \(scenario)", sourceLocation: sourceLocation)
}

extension Verify {
    /// Runs a whole step (update, dispatch, experts, combine) and checks every output of every
    /// active rank against the reference.
    static func wholeStep(_ scenario: Scenario, _ direction: PassDirection, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let harness = try StepHarness(scenario)
        let infos = try harness.runStep(direction)
        let ref = Reference(scenario)
        var problems: [String] = []
        for d in scenario.activeRanks {
            problems += receivedRows(harness, ref, rank: d)
            problems += receivedRouting(harness, ref, rank: d)
            problems += info(infos[d]!, ref, rank: d)
            problems += combined(harness, ref, rank: d, direction)
            if direction == .backward && scenario.config.algorithm == .highThroughput {
                problems += weightGradients(harness, ref, rank: d)
            }
        }
        #expect(problems.isEmpty, "\(problems.prefix(8).joined(separator: "\n"))\nscenario: \(scenario)", sourceLocation: sourceLocation)
    }
}

extension Scenario {
    /// A scenario whose routing entry (s, t, k) is `expert(s, t, k)`.
    static func make(
        _ kind: LayoutKind, ranks: Int, localExperts: Int, topK: Int, hidden: Int = 16, type: DataType = .bf16,
        maxTokens: Int, tokenCounts: [Int], alignment: Int = 4, expert: (Int, Int, Int) -> Int32
    ) -> Scenario {
        let config = GroupConfig(
            algorithm: kind.algorithm, ranks: ranks, experts: ranks * localExperts, topK: topK, hidden: hidden,
            elementType: type, maxTokensPerRank: maxTokens, layout: kind.layout(alignment: alignment))
        let routing = (0..<ranks).map { s in (0..<tokenCounts[s]).flatMap { t in (0..<topK).map { expert(s, t, $0) } } }
        return Scenario(config: config, tokenCounts: tokenCounts, routing: routing, dataSeed: ranks * 1000 + topK)
    }
}
