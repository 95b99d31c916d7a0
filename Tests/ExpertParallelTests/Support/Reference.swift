import ExpertParallel

/// What a receive-buffer row must hold after dispatch.
enum RowContent: Equatable, CustomStringConvertible {
    /// Outside every received zone: the caller's bytes, unchanged.
    case untouched
    /// Padding of an HT expert-major zone: zero bytes.
    case zero
    /// The token row `index` of rank `source`, byte for byte.
    case token(source: Int, index: Int)

    var description: String {
        switch self {
        case .untouched: "untouched"
        case .zero: "zero padding"
        case let .token(s, t): "token \(t) of rank \(s)"
        }
    }
}

/// The counters a dispatch must report (the fields of `LayoutInfo`).
struct ExpectedInfo: Equatable, CustomStringConvertible {
    var expertCounters: [Int]
    var expertOffsets: [Int]
    var sourceRankCounters: [Int]
    var expertSourceCounters: [Int]
    var receivedTotal: Int
    var droppedTokens: Int

    init(expertCounters: [Int], expertOffsets: [Int], sourceRankCounters: [Int], expertSourceCounters: [Int],
         receivedTotal: Int, droppedTokens: Int) {
        self.expertCounters = expertCounters
        self.expertOffsets = expertOffsets
        self.sourceRankCounters = sourceRankCounters
        self.expertSourceCounters = expertSourceCounters
        self.receivedTotal = receivedTotal
        self.droppedTokens = droppedTokens
    }

    init(_ info: LayoutInfo) {
        self.init(expertCounters: info.expertCounters, expertOffsets: info.expertOffsets,
                  sourceRankCounters: info.sourceRankCounters, expertSourceCounters: info.expertSourceCounters,
                  receivedTotal: info.receivedTotal, droppedTokens: info.droppedTokens)
    }

    var description: String {
        "expertCounters \(expertCounters) expertOffsets \(expertOffsets) sourceRankCounters \(sourceRankCounters) expertSourceCounters \(expertSourceCounters) receivedTotal \(receivedTotal) droppedTokens \(droppedTokens)"
    }
}

/// Everything one destination rank must receive.
struct ExpectedReceive {
    /// One entry per row of the `tokens` output (`receiveShape` without its last dimension).
    var rows: [RowContent]
    /// Received row → its `topkIdx` output entries (K of them for rank-major and flat, one for
    /// HT expert-major); rows absent here keep the caller's bytes.
    var index: [Int: [Int]]
    /// Received row → its `topkWeights` output entries, like `index`.
    var weight: [Int: [Float]]
    var info: ExpectedInfo
    /// (source, token) → its row (rank-major, flat).
    var pairRow: [Reference.Pair: Int]
    /// (source, token) → column → its slot (LL and HT expert-major).
    var selectionSlot: [Reference.Pair: [Int: Int]]
}

/// The brute-force reference: what every rank must receive and what every combine must return,
/// computed straight from all ranks' routing and token rows by enumerating sources in ascending
/// rank and tokens in ascending index. It shares no code with the library beyond its types.
final class Reference {
    struct Pair: Hashable, CustomStringConvertible {
        var source: Int, token: Int
        var description: String { "(rank \(source), token \(token))" }
    }

    let scenario: Scenario
    let config: GroupConfig
    let ranks: Int, local: Int, topK: Int, hidden: Int, bmax: Int

    init(_ scenario: Scenario) {
        self.scenario = scenario
        config = scenario.config
        ranks = config.ranks
        local = config.experts / config.ranks
        topK = config.topK
        hidden = config.hidden
        bmax = config.maxTokensPerRank
    }

    var isHighThroughput: Bool { config.algorithm == .highThroughput }
    var isPaddedExpertMajor: Bool { if case .expertMajorPadded = config.layout { true } else { false } }
    var alignment: Int { if case .expertMajorPadded(let a) = config.layout { a } else { 1 } }
    func isActive(_ rank: Int) -> Bool { !scenario.inactive.contains(rank) }

    /// The global expert of selection (s, t, k) once masking applies: nil for -1, for an expert on
    /// an inactive rank, and for every selection of an inactive source.
    func expert(_ s: Int, _ t: Int, _ k: Int) -> Int? {
        let e = Int(scenario.routing[s][t * topK + k])
        guard e >= 0, isActive(s), isActive(e / local) else { return nil }
        return e
    }

    func weight(_ s: Int, _ t: Int, _ k: Int) -> Float { scenario.weights[s][t * topK + k] }

    /// Ranks that receive token t of rank s, ascending, each once.
    func destinations(_ s: Int, _ t: Int) -> [Int] {
        Set((0..<topK).compactMap { expert(s, t, $0).map { $0 / local } }).sorted()
    }

    /// The selections of token (s, t) that live on rank d: (column, local expert), ascending column.
    func selections(_ s: Int, _ t: Int, on d: Int) -> [(column: Int, local: Int)] {
        (0..<topK).compactMap { c in
            guard let e = expert(s, t, c), e / local == d else { return nil }
            return (c, e % local)
        }
    }

    /// (token, d) pairs offered to d, in (source rank, token) order.
    func offered(to d: Int) -> [Pair] {
        var pairs: [Pair] = []
        for s in 0..<ranks {
            for t in 0..<scenario.tokenCounts[s] where !selections(s, t, on: d).isEmpty { pairs.append(Pair(source: s, token: t)) }
        }
        return pairs
    }

    /// Receive-buffer rows the pairs occupy on d: one per pair (flat), or the sum of the padded
    /// expert zones (HT expert-major).
    func rowsOccupied(by pairs: ArraySlice<Pair>, on d: Int) -> Int {
        guard isPaddedExpertMajor else { return pairs.count }
        var counts = Array(repeating: 0, count: local)
        for p in pairs { for sel in selections(p.source, p.token, on: d) { counts[sel.local] += 1 } }
        return counts.reduce(0) { $0 + ReferenceArithmetic.roundUp($1, alignment) }
    }

    func requiredRows(on d: Int) -> Int { rowsOccupied(by: offered(to: d)[...], on: d) }

    /// The pairs d keeps: all of them, except with HT's drop policy, where pairs are kept in
    /// order while they fit and the first one that does not fit ends the kept prefix.
    func kept(on d: Int) -> [Pair] {
        let all = offered(to: d)
        guard isHighThroughput, config.overflow == .drop else { return all }
        var count = 0
        while count < all.count && rowsOccupied(by: all[0...count], on: d) <= config.receiveCapacity { count += 1 }
        return Array(all[0..<count])
    }

    /// HT with the fail policy: the error every rank's update must throw (the lowest overflowing
    /// destination), or nil when everything fits.
    var overflowError: EPError? {
        guard isHighThroughput, config.overflow == .fail else { return nil }
        for d in 0..<ranks {
            let required = requiredRows(on: d)
            if required > config.receiveCapacity { return .overflow(rank: d, required: required, capacity: config.receiveCapacity) }
        }
        return nil
    }

    private var receiveCache: [Int: ExpectedReceive] = [:]

    /// What destination d must hold after dispatch, and the counters it must report.
    func receive(on d: Int) -> ExpectedReceive {
        if let cached = receiveCache[d] { return cached }
        let offeredCount = offered(to: d).count
        let kept = kept(on: d)
        let rowCount = config.receiveShape.dropLast().reduce(1, *)
        var rows = Array(repeating: RowContent.untouched, count: rowCount)
        var index: [Int: [Int]] = [:], weights: [Int: [Float]] = [:]
        var pairRow: [Pair: Int] = [:], selectionSlot: [Pair: [Int: Int]] = [:]

        var perExpert = Array(repeating: [(pair: Pair, column: Int)](), count: local)
        for p in kept { for sel in selections(p.source, p.token, on: d) { perExpert[sel.local].append((p, sel.column)) } }
        var sourceCounters = Array(repeating: 0, count: ranks)
        for p in kept { sourceCounters[p.source] += 1 }
        var expertSource = Array(repeating: 0, count: local * ranks)
        for l in 0..<local { for entry in perExpert[l] { expertSource[l * ranks + entry.pair.source] += 1 } }
        let expertCounters = perExpert.map(\.count)

        func routingRow(_ p: Pair) -> ([Int], [Float]) {
            let idx = (0..<topK).map { c in expert(p.source, p.token, c).flatMap { $0 / local == d ? $0 % local : nil } ?? -1 }
            let w = (0..<topK).map { c in idx[c] >= 0 ? weight(p.source, p.token, c) : 0 }
            return (idx, w)
        }

        var offsets = Array(repeating: 0, count: local)
        let total: Int
        switch config.layout {
        case .expertMajor:
            for l in 0..<local {
                offsets[l] = l * ranks * bmax
                for (i, entry) in perExpert[l].enumerated() {
                    rows[offsets[l] + i] = .token(source: entry.pair.source, index: entry.pair.token)
                    selectionSlot[entry.pair, default: [:]][entry.column] = offsets[l] + i
                }
            }
            total = expertCounters.reduce(0, +)
        case .rankMajor:
            var next = Array(repeating: 0, count: ranks)
            for p in kept {
                let row = p.source * bmax + next[p.source]
                next[p.source] += 1
                rows[row] = .token(source: p.source, index: p.token)
                (index[row], weights[row]) = routingRow(p)
                pairRow[p] = row
            }
            total = kept.count
        case .flat:
            for (row, p) in kept.enumerated() {
                rows[row] = .token(source: p.source, index: p.token)
                (index[row], weights[row]) = routingRow(p)
                pairRow[p] = row
            }
            total = kept.count
        case .expertMajorPadded(let a):
            var start = 0
            for l in 0..<local {
                offsets[l] = start
                for (i, entry) in perExpert[l].enumerated() {
                    rows[start + i] = .token(source: entry.pair.source, index: entry.pair.token)
                    index[start + i] = [l]
                    weights[start + i] = [weight(entry.pair.source, entry.pair.token, entry.column)]
                    selectionSlot[entry.pair, default: [:]][entry.column] = start + i
                }
                let padded = ReferenceArithmetic.roundUp(perExpert[l].count, a)
                for slot in start + perExpert[l].count..<start + padded {
                    rows[slot] = .zero
                    index[slot] = [-1]
                    weights[slot] = [0]
                }
                start += padded
            }
            total = start
        }
        let info = ExpectedInfo(
            expertCounters: expertCounters, expertOffsets: offsets, sourceRankCounters: sourceCounters,
            expertSourceCounters: expertSource, receivedTotal: total, droppedTokens: offeredCount - kept.count)
        let result = ExpectedReceive(rows: rows, index: index, weight: weights, info: info, pairRow: pairRow, selectionSlot: selectionSlot)
        receiveCache[d] = result
        return result
    }

    /// Token row (s, t) as float32.
    func tokenValues(_ s: Int, _ t: Int) -> [Float] {
        let rowBytes = config.rowBytes
        return ReferenceArithmetic.decodeRow(scenario.tokens[s][t * rowBytes..<(t + 1) * rowBytes], hidden, config.elementType)
    }

    /// What the test's stand-in expert returns for pair (s, t) on d in the rank-major and flat
    /// layouts: the token's selections on d, weighted and summed in ascending column, rounded once.
    func expertRow(_ s: Int, _ t: Int, on d: Int) -> [Float] {
        let x = tokenValues(s, t)
        var y = Array(repeating: Float(0), count: hidden)
        for sel in selections(s, t, on: d) {
            let w = weight(s, t, sel.column)
            for i in 0..<hidden { y[i] = y[i].addingProduct(w, x[i]) }
        }
        return y.map { ReferenceArithmetic.rounded($0, to: config.elementType) }
    }

    /// The bytes combine must write for rank s (`[B, H]`), with identity experts in the
    /// expert-major layouts and `expertRow` in the others.
    func combined(_ s: Int, _ direction: PassDirection) -> [UInt8] {
        let forward = direction == .forward
        let type = config.elementType
        var out: [UInt8] = []
        out.reserveCapacity(scenario.tokenCounts[s] * config.rowBytes)
        for t in 0..<scenario.tokenCounts[s] {
            var acc = Array(repeating: Float(0), count: hidden)
            let pair = Pair(source: s, token: t)
            switch config.layout {
            case .expertMajor:
                let x = tokenValues(s, t)
                for c in 0..<topK where expert(s, t, c) != nil {
                    let w = forward ? weight(s, t, c) : 1
                    for i in 0..<hidden { acc[i] = acc[i].addingProduct(w, x[i]) }
                }
            case .rankMajor, .flat:
                for d in destinations(s, t) where receive(on: d).pairRow[pair] != nil {
                    let y = expertRow(s, t, on: d)
                    for i in 0..<hidden { acc[i] = acc[i].addingProduct(1, y[i]) }
                }
            case .expertMajorPadded:
                let x = tokenValues(s, t)
                for d in destinations(s, t) where receive(on: d).selectionSlot[pair] != nil {
                    var partial = Array(repeating: Float(0), count: hidden)
                    for sel in selections(s, t, on: d).sorted(by: { $0.local < $1.local }) {
                        let w = forward ? weight(s, t, sel.column) : 1
                        for i in 0..<hidden { partial[i] = partial[i].addingProduct(w, x[i]) }
                    }
                    for i in 0..<hidden { acc[i] = acc[i].addingProduct(1, ReferenceArithmetic.rounded(partial[i], to: type)) }
                }
            }
            out += ReferenceArithmetic.encodeRow(acc, as: type)
        }
        return out
    }

    /// Backward HT: the weight gradient of each (token, k) of rank s, `[B, K]`: the value the
    /// destination put at the received row and column (flat) or slot (expert-major); 0 where the
    /// selection is -1, masked or dropped.
    func weightGradients(_ s: Int) -> [Float] {
        var out: [Float] = []
        for t in 0..<scenario.tokenCounts[s] {
            let pair = Pair(source: s, token: t)
            for c in 0..<topK {
                var g: Float = 0
                if let e = expert(s, t, c) {
                    let d = e / local, received = receive(on: d)
                    if isPaddedExpertMajor, let slot = received.selectionSlot[pair]?[c] {
                        g = scenario.weightGradients[d][slot]
                    } else if !isPaddedExpertMajor, let row = received.pairRow[pair] {
                        g = scenario.weightGradients[d][row * topK + c]
                    }
                }
                out.append(g)
            }
        }
        return out
    }
}
