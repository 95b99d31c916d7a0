import ExpertParallel
import Testing

/// A step small enough to work out by hand, with literal expectations: they check the library
/// and the test suite's reference alike.
///
/// R = 2, E = 4 (L = 2: experts 0, 1 on rank 0; 2, 3 on rank 1), K = 2, H = 4, bf16, Bmax = 3,
/// HT expert-major alignment 2. Every element of token row (s, t) is `10 s + t + 1`.
///
///     rank 0: token 0 → experts [1, 2]  weights [0.5, 0.25]
///             token 1 → experts [3, -1] weights [2, 0.75]
///     rank 1: token 0 → experts [0, 3]  weights [1, 0.5]
///             token 1 → experts [-1, -1]
///             token 2 → experts [2, 1]  weights [0.125, 4]
///
/// Combine (forward) of rank 1 token 2: 13 × 0.125 + 13 × 4 = 53.625, which bf16 rounds to
/// 53.5 (a tie, to the even neighbour).
enum HandWorkedExample {
    static func scenario(_ kind: LayoutKind, capacity: Int? = nil, overflow: OverflowPolicy = .fail) -> Scenario {
        let config = GroupConfig(
            algorithm: kind.algorithm, ranks: 2, experts: 4, topK: 2, hidden: 4, elementType: .bf16, maxTokensPerRank: 3,
            maxReceivedTokensPerRank: capacity, layout: kind.layout(alignment: 2), overflow: overflow)
        var scenario = Scenario(config: config, tokenCounts: [2, 3], routing: [[1, 2, 3, -1], [0, 3, -1, -1, 2, 1]])
        scenario.setTokenValues { s, t in Float(10 * s + t + 1) }
        scenario.weights = [[0.5, 0.25, 2, 0.75], [1, 0.5, 0.3, 0.3, 0.125, 4]]
        if kind.algorithm == .highThroughput {
            let perRow = kind == .htFlat ? 2 : 1
            scenario.weightGradients = (0..<2).map { (d: Int) -> [Float] in
                (0..<config.receiveCapacity * perRow).map { (i: Int) -> Float in
                    // 1000 + 100 d + 10 row + column (flat), 1000 + 100 d + slot (expert-major)
                    let code: Int = kind == .htFlat ? 1000 + 100 * d + 10 * (i / 2) + i % 2 : 1000 + 100 * d + i
                    return Float(code)
                }
            }
        }
        return scenario
    }

    /// What one destination must hold: row → the value of all its elements (0 = zero padding),
    /// row → (topkIdx, topkWeights), and the layout info.
    struct Received {
        var rows: [Int: Float]
        var routing: [Int: ([Int], [Float])] = [:]
        var info: ExpectedInfo
    }

    static func info(_ counters: [Int], _ offsets: [Int], _ sources: [Int], _ expertSource: [Int], _ total: Int, dropped: Int = 0) -> ExpectedInfo {
        ExpectedInfo(expertCounters: counters, expertOffsets: offsets, sourceRankCounters: sources,
                     expertSourceCounters: expertSource, receivedTotal: total, droppedTokens: dropped)
    }

    static func received(_ kind: LayoutKind) -> [Received] {
        switch kind {
        case .llExpertMajor: [
            Received(rows: [0: 11, 6: 1, 7: 13], info: info([1, 2], [0, 6], [1, 2], [0, 1, 1, 1], 3)),
            Received(rows: [0: 1, 1: 13, 6: 2, 7: 11], info: info([2, 2], [0, 6], [2, 2], [1, 1, 1, 1], 4)),
        ]
        case .llRankMajor: [
            Received(rows: [0: 1, 3: 11, 4: 13],
                     routing: [0: ([1, -1], [0.5, 0]), 3: ([0, -1], [1, 0]), 4: ([-1, 1], [0, 4])],
                     info: info([1, 2], [0, 0], [1, 2], [0, 1, 1, 1], 3)),
            Received(rows: [0: 1, 1: 2, 3: 11, 4: 13],
                     routing: [0: ([-1, 0], [0, 0.25]), 1: ([1, -1], [2, 0]), 3: ([-1, 1], [0, 0.5]), 4: ([0, -1], [0.125, 0])],
                     info: info([2, 2], [0, 0], [2, 2], [1, 1, 1, 1], 4)),
        ]
        case .htFlat: [
            Received(rows: [0: 1, 1: 11, 2: 13],
                     routing: [0: ([1, -1], [0.5, 0]), 1: ([0, -1], [1, 0]), 2: ([-1, 1], [0, 4])],
                     info: info([1, 2], [0, 0], [1, 2], [0, 1, 1, 1], 3)),
            Received(rows: [0: 1, 1: 2, 2: 11, 3: 13],
                     routing: [0: ([-1, 0], [0, 0.25]), 1: ([1, -1], [2, 0]), 2: ([-1, 1], [0, 0.5]), 3: ([0, -1], [0.125, 0])],
                     info: info([2, 2], [0, 0], [2, 2], [1, 1, 1, 1], 4)),
        ]
        case .htExpertMajor: [
            Received(rows: [0: 11, 1: 0, 2: 1, 3: 13],
                     routing: [0: ([0], [1]), 1: ([-1], [0]), 2: ([1], [0.5]), 3: ([1], [4])],
                     info: info([1, 2], [0, 2], [1, 2], [0, 1, 1, 1], 4)),
            Received(rows: [0: 1, 1: 13, 2: 2, 3: 11],
                     routing: [0: ([0], [0.25]), 1: ([0], [0.125]), 2: ([1], [2]), 3: ([1], [0.5])],
                     info: info([2, 2], [0, 2], [2, 2], [1, 1, 1, 1], 4)),
        ]
        }
    }

    static let combinedForward: [[Float]] = [[0.75, 4], [16.5, 0, 53.5]]

    static func combinedBackward(_ kind: LayoutKind) -> [[Float]] {
        switch kind {
        case .llExpertMajor, .htExpertMajor: [[2, 2], [22, 0, 26]]        // unweighted
        case .llRankMajor, .htFlat: combinedForward                         // the stand-in expert weights
        }
    }

    static func weightGradients(_ kind: LayoutKind) -> [[Float]] {
        kind == .htFlat
            ? [[1000, 1101, 1110, 0], [1010, 1121, 0, 0, 1130, 1021]]
            : [[1002, 1100, 1102, 0], [1000, 1103, 0, 0, 1101, 1003]]
    }
}

/// Checks of a harness (or of the reference) against literal expectations.
enum Literal {
    static func rowValue(_ bytes: UnsafeRawBufferPointer, hidden: Int, _ type: DataType) -> Float? {
        let values = (0..<hidden).map { ReferenceArithmetic.decode(bytes, $0, type) }
        return values.allSatisfy { $0.bitPattern == values[0].bitPattern } ? values[0] : nil
    }

    static func checkReceived(_ h: StepHarness, _ expected: [HandWorkedExample.Received], _ infos: [Int: LayoutInfo]) {
        let rowBytes = h.config.rowBytes
        for (d, want) in expected.enumerated() {
            #expect(ExpectedInfo(infos[d]!) == want.info, "rank \(d)")
            let all = h.received[d].bytes()
            for row in 0..<all.count / rowBytes {
                let bytes = all[row * rowBytes..<(row + 1) * rowBytes]
                if let value = want.rows[row] {
                    let got = bytes.withUnsafeBytes { rowValue($0, hidden: h.config.hidden, h.config.elementType) }
                    #expect(got == value, "rank \(d) row \(row)")
                    if value == 0 { #expect(bytes.allSatisfy { $0 == 0 }, "rank \(d) padding row \(row) is zero bytes") }
                } else {
                    #expect(bytes.allSatisfy { $0 == StepHarness.poison }, "rank \(d) row \(row) untouched")
                }
            }
            guard let idx = h.receivedIdx[d], let weights = h.receivedWeights[d] else { continue }
            let perRow = h.config.receiveRoutingShape!.count == 1 ? 1 : h.config.topK
            for (row, (wantIdx, wantWeights)) in want.routing {
                let gotIdx = (0..<perRow).map { Int(idx[as: Int32.self, row * perRow + $0]) }
                let gotWeights = (0..<perRow).map { weights[as: Float.self, row * perRow + $0] }
                #expect(gotIdx == wantIdx, "rank \(d) topkIdx row \(row)")
                #expect(gotWeights == wantWeights, "rank \(d) topkWeights row \(row)")
            }
        }
    }

    static func combinedValues(_ h: StepHarness, rank: Int) -> [Float?] {
        let rowBytes = h.config.rowBytes
        let all = h.combined[rank].bytes()
        return (0..<h.scenario.tokenCounts[rank]).map { t in
            all[t * rowBytes..<(t + 1) * rowBytes].withUnsafeBytes { rowValue($0, hidden: h.config.hidden, h.config.elementType) }
        }
    }
}

@Suite("Hand-worked example")
struct HandWorkedExampleTests {
    @Test("dispatch puts each row, index and weight where the worked example says", arguments: LayoutKind.allCases)
    func dispatchMatchesWorkedExample(kind: LayoutKind) throws {
        let harness = try StepHarness(HandWorkedExample.scenario(kind))
        let infos = try harness.runStep(.forward)
        Literal.checkReceived(harness, HandWorkedExample.received(kind), infos)
    }

    @Test("forward combine gives the worked values, bf16 tie 53.625 → 53.5 included", arguments: LayoutKind.allCases)
    func forwardCombineMatchesWorkedExample(kind: LayoutKind) throws {
        let harness = try StepHarness(HandWorkedExample.scenario(kind))
        try harness.runStep(.forward)
        for s in 0..<2 { #expect(Literal.combinedValues(harness, rank: s) == HandWorkedExample.combinedForward[s], "rank \(s)") }
    }

    @Test("backward combine gives the worked values", arguments: LayoutKind.allCases)
    func backwardCombineMatchesWorkedExample(kind: LayoutKind) throws {
        let harness = try StepHarness(HandWorkedExample.scenario(kind))
        try harness.runStep(.backward)
        for s in 0..<2 { #expect(Literal.combinedValues(harness, rank: s) == HandWorkedExample.combinedBackward(kind)[s], "rank \(s)") }
    }

    @Test("backward HT combine returns the worked weight gradients", arguments: LayoutKind.highThroughput)
    func weightGradientsMatchWorkedExample(kind: LayoutKind) throws {
        let harness = try StepHarness(HandWorkedExample.scenario(kind))
        try harness.runStep(.backward)
        for s in 0..<2 {
            #expect(try harness.combinedWeightGradients[s]!.array(of: Float.self) == HandWorkedExample.weightGradients(kind)[s], "rank \(s)")
        }
    }

    @Test("the test suite's reference agrees with the worked example", arguments: LayoutKind.allCases)
    func referenceMatchesWorkedExample(kind: LayoutKind) {
        let scenario = HandWorkedExample.scenario(kind)
        let ref = Reference(scenario)
        for (d, want) in HandWorkedExample.received(kind).enumerated() {
            let got = ref.receive(on: d)
            #expect(got.info == want.info)
            for (row, content) in got.rows.enumerated() {
                switch content {
                case .untouched: #expect(want.rows[row] == nil, "rank \(d) row \(row)")
                case .zero: #expect(want.rows[row] == 0, "rank \(d) row \(row)")
                case let .token(s, t): #expect(want.rows[row] == Float(10 * s + t + 1), "rank \(d) row \(row)")
                }
            }
            for (row, (idx, weights)) in want.routing {
                #expect(got.index[row] == idx && got.weight[row] == weights, "rank \(d) row \(row)")
            }
        }
        for s in 0..<2 {
            let bytes = ref.combined(s, .forward)
            let values = (0..<scenario.tokenCounts[s]).map { t in
                bytes[t * 8..<(t + 1) * 8].withUnsafeBytes { Literal.rowValue($0, hidden: 4, .bf16) }
            }
            #expect(values == HandWorkedExample.combinedForward[s])
        }
        if kind.algorithm == .highThroughput {
            for s in 0..<2 { #expect(ref.weightGradients(s) == HandWorkedExample.weightGradients(kind)[s]) }
        }
    }

    // MARK: Overflow, worked by hand

    @Test("drop, flat, N = 2: each rank keeps its first two pairs in (source, token) order")
    func dropFlatWorkedExample() throws {
        let harness = try StepHarness(HandWorkedExample.scenario(.htFlat, capacity: 2, overflow: .drop))
        let infos = try harness.runStep(.backward)
        Literal.checkReceived(harness, [
            .init(rows: [0: 1, 1: 11], routing: [0: ([1, -1], [0.5, 0]), 1: ([0, -1], [1, 0])],
                  info: HandWorkedExample.info([1, 1], [0, 0], [1, 1], [0, 1, 1, 0], 2, dropped: 1)),
            .init(rows: [0: 1, 1: 2], routing: [0: ([-1, 0], [0, 0.25]), 1: ([1, -1], [2, 0])],
                  info: HandWorkedExample.info([1, 1], [0, 0], [2, 0], [1, 0, 1, 0], 2, dropped: 2)),
        ], infos)
        #expect(Literal.combinedValues(harness, rank: 0) == [0.75, 4])
        #expect(Literal.combinedValues(harness, rank: 1) == [11, 0, 0])
        #expect(try harness.combinedWeightGradients[0]!.array(of: Float.self) == [1000, 1101, 1110, 0])
        #expect(try harness.combinedWeightGradients[1]!.array(of: Float.self) == [1010, 0, 0, 0, 0, 0])
    }

    @Test("drop, expert-major, N = 3: the first pair that does not fit ends the kept prefix, even if a later one would fit")
    func dropExpertMajorWorkedExample() throws {
        // Rank 0 receives (0,0)→local 1 [2 rows], then (1,0)→local 0 would need 4 rows > 3: dropped,
        // and so is (1,2)→local 1, although local 1's zone still had a padding row for it.
        let harness = try StepHarness(HandWorkedExample.scenario(.htExpertMajor, capacity: 3, overflow: .drop))
        let infos = try harness.runStep(.forward)
        Literal.checkReceived(harness, [
            .init(rows: [0: 1, 1: 0], routing: [0: ([1], [0.5]), 1: ([-1], [0])],
                  info: HandWorkedExample.info([0, 1], [0, 0], [1, 0], [0, 0, 1, 0], 2, dropped: 2)),
            .init(rows: [0: 1, 1: 0], routing: [0: ([0], [0.25]), 1: ([-1], [0])],
                  info: HandWorkedExample.info([1, 0], [0, 2], [1, 0], [1, 0, 0, 0], 2, dropped: 3)),
        ], infos)
        #expect(Literal.combinedValues(harness, rank: 0) == [0.75, 0])
        #expect(Literal.combinedValues(harness, rank: 1) == [0, 0, 0])
    }

    @Test("fail, expert-major, N = 3: every rank throws overflow(rank 0, required 4, capacity 3)")
    func failExpertMajorWorkedExample() throws {
        let harness = try StepHarness(HandWorkedExample.scenario(.htExpertMajor, capacity: 3))
        for (_, result) in harness.update() {
            #expect(throws: EPError.overflow(rank: 0, required: 4, capacity: 3)) { try result.get() }
        }
    }
}
