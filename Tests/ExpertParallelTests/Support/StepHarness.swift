import ExpertParallel

/// Drives one step of a host group over a scenario: owns every rank's input and output tensors,
/// fills the outputs with a poison byte first, and runs each call on all active ranks at once
/// (`HostGroup.run`, one thread per rank).
final class StepHarness: @unchecked Sendable {
    static let poison: UInt8 = 0xA5

    let scenario: Scenario
    let config: GroupConfig
    let group: HostGroup
    let handles: [HostHandle]

    // Inputs, per rank.
    let topkIdx: [HostTensor]
    let tokens: [HostTensor]
    let weights: [HostTensor]
    // Dispatch outputs, per rank.
    let received: [HostTensor]
    let receivedIdx: [HostTensor?]
    let receivedWeights: [HostTensor?]
    // Combine inputs and outputs, per rank.
    /// The dispatch output itself in the expert-major layouts (identity experts); a separate
    /// tensor filled by `runExperts` in the others.
    let expertOutputs: [HostTensor]
    let weightGradients: [HostTensor?]
    let combined: [HostTensor]
    let combinedWeightGradients: [HostTensor?]

    init(_ scenario: Scenario) throws(EPError) {
        self.scenario = scenario
        let config = scenario.config
        self.config = config
        group = try HostGroup(config)
        for r in scenario.inactive { try group[0].deactivate(rank: r) }
        var handles: [HostHandle] = []
        for r in 0..<config.ranks { handles.append(try group[r].makeHandle()) }
        self.handles = handles

        let r = config.ranks, k = config.topK, h = config.hidden
        topkIdx = try (0..<r).map { rank throws(EPError) in
            let t = try HostTensor(scenario.indexType, [scenario.tokenCounts[rank], k])
            for (i, e) in scenario.routing[rank].enumerated() {
                if scenario.indexType == .i32 { t[as: Int32.self, i] = e } else { t[as: Int64.self, i] = Int64(e) }
            }
            return t
        }
        tokens = try (0..<r).map { rank throws(EPError) in
            let t = try HostTensor(config.elementType, [scenario.tokenCounts[rank], h])
            scenario.tokens[rank].withUnsafeBytes { if $0.count > 0 { t.storage.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
            return t
        }
        weights = try (0..<r).map { rank throws(EPError) in
            let t = try HostTensor(.f32, [scenario.tokenCounts[rank], k])
            for (i, w) in scenario.weights[rank].enumerated() { t[as: Float.self, i] = w }
            return t
        }
        let received = try (0..<r).map { _ throws(EPError) in try HostTensor(config.elementType, config.receiveShape) }
        self.received = received
        let routingShape = config.receiveRoutingShape
        receivedIdx = try (0..<r).map { _ throws(EPError) in try routingShape.map { shape throws(EPError) in try HostTensor(scenario.receivedIndexType, shape) } }
        receivedWeights = try (0..<r).map { _ throws(EPError) in try routingShape.map { shape throws(EPError) in try HostTensor(.f32, shape) } }
        let expertMajor = config.layout == .expertMajor || config.isExpertMajorHT
        expertOutputs = try (0..<r).map { rank throws(EPError) in expertMajor ? received[rank] : try HostTensor(config.elementType, config.receiveShape) }
        let highThroughput = config.algorithm == .highThroughput
        weightGradients = try (0..<r).map { rank throws(EPError) in
            guard highThroughput, let shape = routingShape else { return nil }
            let t = try HostTensor(.f32, shape)
            precondition(scenario.weightGradients[rank].count == t.elementCount, "weight gradients sized for another capacity")
            for (i, g) in scenario.weightGradients[rank].enumerated() { t[as: Float.self, i] = g }
            return t
        }
        combined = try (0..<r).map { rank throws(EPError) in try HostTensor(config.elementType, [scenario.tokenCounts[rank], h]) }
        combinedWeightGradients = try (0..<r).map { rank throws(EPError) in highThroughput ? try HostTensor(.f32, [scenario.tokenCounts[rank], k]) : nil }
        poisonOutputs()
    }

    var activeRanks: [Int] { scenario.activeRanks }

    /// Every tensor the library may write, as (name, tensor) pairs.
    func outputTensors(of rank: Int) -> [(String, HostTensor)] {
        var list: [(String, HostTensor)] = [("dispatch tokens", received[rank]), ("combine tokens", combined[rank])]
        if let t = receivedIdx[rank] { list.append(("dispatch topkIdx", t)) }
        if let t = receivedWeights[rank] { list.append(("dispatch topkWeights", t)) }
        if let t = combinedWeightGradients[rank] { list.append(("combine topkWeightGradients", t)) }
        return list
    }

    func poisonOutputs() {
        for rank in 0..<config.ranks {
            for (_, t) in outputTensors(of: rank) { t.fill(byte: Self.poison) }
            if expertOutputs[rank] !== received[rank] { expertOutputs[rank].fill(byte: Self.poison) }
        }
    }

    // MARK: The call arguments of each rank

    func dispatchInput(_ rank: Int) -> DispatchInput {
        let passWeights = config.layout != .expertMajor || scenario.passesWeightsToExpertMajorDispatch
        return DispatchInput(tokens: tokens[rank].ref, topkWeights: passWeights ? weights[rank].ref : nil)
    }

    func dispatchOutput(_ rank: Int) -> DispatchOutput {
        DispatchOutput(tokens: received[rank].ref, topkIdx: receivedIdx[rank]?.ref, topkWeights: receivedWeights[rank]?.ref)
    }

    func combineInput(_ rank: Int, _ direction: PassDirection) -> CombineInput {
        switch config.layout {
        case .expertMajor:
            // The source's own weights, forward only: a backward combine refuses them.
            CombineInput(expertOutputs: expertOutputs[rank].ref, topkWeights: direction == .forward ? weights[rank].ref : nil)
        case .rankMajor:
            CombineInput(expertOutputs: expertOutputs[rank].ref)
        case .flat:
            CombineInput(expertOutputs: expertOutputs[rank].ref,
                         weightGradients: direction == .backward ? weightGradients[rank]?.ref : nil)
        case .expertMajorPadded:
            // The per-slot weights dispatch delivered, forward only: a backward combine refuses them.
            CombineInput(expertOutputs: expertOutputs[rank].ref, topkWeights: direction == .forward ? receivedWeights[rank]?.ref : nil,
                         weightGradients: direction == .backward ? weightGradients[rank]?.ref : nil)
        }
    }

    func combineOutput(_ rank: Int, _ direction: PassDirection) -> CombineOutput {
        let gradients = direction == .backward && config.algorithm == .highThroughput
        return CombineOutput(tokens: combined[rank].ref, topkWeightGradients: gradients ? combinedWeightGradients[rank]?.ref : nil)
    }

    // MARK: Calls on all active ranks at once

    /// Runs `body` on `ranks` (default: the active ranks) concurrently; results keyed by rank.
    func onRanks<T: Sendable>(
        _ ranks: [Int]? = nil, _ body: @escaping @Sendable (HostRank, HostHandle) throws(EPError) -> T
    ) -> [Int: Result<T, EPError>] {
        let chosen = ranks ?? activeRanks
        let handles = self.handles
        let results = group.run(ranks: chosen) { (rank: HostRank) throws(EPError) -> T in try body(rank, handles[rank.rank]) }
        return Dictionary(uniqueKeysWithValues: zip(chosen, results))
    }

    func update(ranks: [Int]? = nil) -> [Int: Result<Void, EPError>] {
        onRanks(ranks) { rank, handle throws(EPError) in try rank.update(handle, topkIdx: self.topkIdx[rank.rank].ref) }
    }

    func dispatch(_ direction: PassDirection = .forward, ranks: [Int]? = nil) -> [Int: Result<LayoutInfo, EPError>] {
        onRanks(ranks) { rank, handle throws(EPError) in
            try rank.dispatch(handle, self.dispatchInput(rank.rank), into: self.dispatchOutput(rank.rank), direction: direction)
        }
    }

    func combine(_ direction: PassDirection = .forward, ranks: [Int]? = nil) -> [Int: Result<Void, EPError>] {
        onRanks(ranks) { rank, handle throws(EPError) in
            try rank.combine(handle, self.combineInput(rank.rank, direction), into: self.combineOutput(rank.rank, direction), direction: direction)
        }
    }

    /// The stand-in experts of the rank-major and flat layouts: each received row becomes the
    /// sum, in ascending column, of the row times the weight of each of its local selections,
    /// rounded once to the element type (computed here, from the dispatch outputs).
    func runExperts(_ infos: [Int: LayoutInfo]) {
        guard config.layout == .rankMajor || config.layout == .flat else { return }
        let k = config.topK, h = config.hidden, type = config.elementType, rowBytes = config.rowBytes
        for (rank, info) in infos {
            let rows: [Int] = config.layout == .flat
                ? Array(0..<info.receivedTotal)
                : (0..<config.ranks).flatMap { s in (0..<info.sourceRankCounters[s]).map { s * config.maxTokensPerRank + $0 } }
            let x = UnsafeRawBufferPointer(start: received[rank].storage, count: received[rank].byteCount)
            let idx = receivedIdx[rank]!, w = receivedWeights[rank]!
            for row in rows {
                var y = Array(repeating: Float(0), count: h)
                for c in 0..<k {
                    let local = idx.dtype == .i32 ? Int(idx[as: Int32.self, row * k + c]) : Int(idx[as: Int64.self, row * k + c])
                    guard local != -1 else { continue }
                    let weight = w[as: Float.self, row * k + c]
                    let base = UnsafeRawBufferPointer(rebasing: x[row * rowBytes..<(row + 1) * rowBytes])
                    for i in 0..<h { y[i] = y[i].addingProduct(weight, ReferenceArithmetic.decode(base, i, type)) }
                }
                let bytes = ReferenceArithmetic.encodeRow(y.map { ReferenceArithmetic.rounded($0, to: type) }, as: type)
                bytes.withUnsafeBytes { (expertOutputs[rank].storage + row * rowBytes).copyMemory(from: $0.baseAddress!, byteCount: rowBytes) }
            }
        }
    }

    /// update, dispatch, experts, combine on the active ranks; any error is a test failure.
    @discardableResult
    func runStep(_ direction: PassDirection = .forward, ranks: [Int]? = nil) throws -> [Int: LayoutInfo] {
        for (_, result) in update(ranks: ranks) { try result.get() }
        let infos = try dispatch(direction, ranks: ranks).mapValues { try $0.get() }
        runExperts(infos)
        for (_, result) in combine(direction, ranks: ranks) { try result.get() }
        return infos
    }
}
