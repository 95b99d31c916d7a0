@testable import ExpertParallelC
import CExpertParallel
import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// The stacked calls of a virtual GPU group (one description per argument) launch exactly what
/// the per-rank calls launch for the same tensors: the same kernels with the same argument
/// blocks, byte for byte, in every layout (over the mock driver, so CI checks it without a GPU).
@Suite(.serialized)
struct StackedCallMockTests {
    static let cases: [(String, GroupConfig)] = [
        ("ll expert-major", GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 8, topK: 2, hidden: 128, maxTokensPerRank: 4)),
        ("ll rank-major", GroupConfig(algorithm: .lowLatency, ranks: 3, experts: 6, topK: 2, hidden: 64, maxTokensPerRank: 4, layout: .rankMajor)),
        ("ht flat", GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 8, topK: 3, hidden: 96, maxTokensPerRank: 5)),
        ("ht padded", GroupConfig(algorithm: .highThroughput, ranks: 2, experts: 4, topK: 2, hidden: 64, maxTokensPerRank: 4,
                                  layout: .expertMajorPadded(alignment: 4))),
        ("fp8 pass-through", GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 256, maxTokensPerRank: 4,
                                         fp8: FP8Dispatch(scales: .float32Block128, source: .passThrough))),
    ]

    /// One `[R, ...]` device array per argument, and each rank's part of it as a tensor.
    struct Arrays {
        let config: GroupConfig
        var keep: [DeviceTensor] = []
        var stacked: [String: StackedTensor] = [:]
        var parts: [String: [TensorRef]] = [:]

        init(_ config: GroupConfig, tokens b: Int, device: GPUDevice) throws {
            self.config = config
            let r = config.ranks, k = config.topK, l = config.localExperts
            try add("idx", .i32, [b, k], device)
            try add("x", config.dispatchInputType, [b, config.hidden], device)
            try add("w", .f32, [b, k], device)
            try add("recv", config.receiveElementType, config.receiveShape, device)
            if let routing = config.receiveRoutingShape {
                try add("recvIdx", .i32, routing, device)
                try add("recvW", .f32, routing, device)
                try add("gradIn", .f32, routing, device)
            }
            if let fp8 = config.fp8, let format = config.fp8Format, let scales = config.receiveScalesShape {
                try add("scales", fp8.scaleType, [b, format.scaleWordsPerRow], device)
                try add("recvScales", fp8.scaleType, scales, device)
            }
            try add("counts", .i32, [l], device)
            try add("sources", .i32, [l, r], device)
            try add("y", config.elementType, config.receiveShape, device)
            try add("out", config.elementType, [b, config.hidden], device)
            try add("gradOut", .f32, [b, k], device)
            // Valid routing: token t of every rank picks experts t, t + 1, ... (mod E).
            let host = try HostTensor(.i32, [r, b, k])
            for i in 0..<(r * b * k) { host[as: Int32.self, i] = Int32((i / k % b + i % k) % config.experts) }
            try keep[0].upload(host)
        }

        private mutating func add(_ name: String, _ dtype: DataType, _ shape: [Int], _ device: GPUDevice) throws {
            let tensor = try DeviceTensor(dtype, [config.ranks] + shape, on: device)
            keep.append(tensor)
            let base = UInt64(UInt(bitPattern: tensor.ref.address)), bytes = shape.reduce(1, *) * dtype.byteSize
            stacked[name] = StackedTensor(address: base, dtype: dtype, location: .device(0))
            parts[name] = (0..<config.ranks).map {
                TensorRef(address: UnsafeMutableRawPointer(bitPattern: UInt(base) + UInt($0 * bytes)), dtype: dtype, shape: shape,
                          location: .device(0), owner: tensor)
            }
        }

        func part(_ name: String, _ r: Int) -> TensorRef? { parts[name]?[r] }

        func dispatchInput(_ r: Int) -> DispatchInput {
            DispatchInput(tokens: part("x", r)!, topkWeights: part("w", r), scales: part("scales", r))
        }

        func dispatchOutput(_ r: Int) -> DispatchOutput {
            DispatchOutput(tokens: part("recv", r)!, topkIdx: part("recvIdx", r), topkWeights: part("recvW", r),
                           expertCounts: part("counts", r), expertSourceCounts: part("sources", r), scales: part("recvScales", r))
        }

        /// The weights combine applies: the source's (LL expert-major) or the per-slot ones (HT padded).
        var combineWeights: String? { config.layout == .expertMajor ? "w" : config.isExpertMajorHT ? "recvW" : nil }

        func stackedDispatch(tokens: Int, routing: Bool) -> StackedDispatch {
            StackedDispatch(tokens: tokens, topkIdx: routing ? stacked["idx"] : nil, inputs: stacked["x"]!, topkWeights: stacked["w"],
                            scales: stacked["scales"], received: stacked["recv"]!, receivedTopkIdx: stacked["recvIdx"],
                            receivedTopkWeights: stacked["recvW"], receivedScales: stacked["recvScales"], expertCounts: stacked["counts"],
                            expertSourceCounts: stacked["sources"])
        }
    }

    /// The argument blocks launched by `body`.
    static func launched(_ mock: MockCUDA.State, _ body: () throws -> Void) rethrows -> [[UInt8]] {
        let before = mock.launchedParameters.count
        try body()
        return Array(mock.launchedParameters[before...])
    }

    @Test(arguments: cases.indices)
    func stackedCallsLaunchWhatPerRankCallsLaunch(_ index: Int) throws {
        let (name, config) = Self.cases[index]
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let group = try VirtualGPUGroup(config, device: device)
            mock.captureParameterBytes = StepArguments.rankBytes * config.ranks + LaunchField.allCases.count * 8
            let b = config.maxTokensPerRank - 1
            let a = try Arrays(config, tokens: b, device: device)
            let handle = try group.makeHandle()
            let r = config.ranks
            let weighted = a.combineWeights
            let ht = config.algorithm == .highThroughput
            let perRank = try Self.launched(mock) {
                // Update and dispatch in one call, as the stacked dispatch (LL: one fused launch).
                try group.dispatch(handle, topkIdx: (0..<r).map { a.part("idx", $0)! }, (0..<r).map(a.dispatchInput),
                                   into: (0..<r).map(a.dispatchOutput))
                try group.combine(handle, (0..<r).map { i in CombineInput(expertOutputs: a.part("y", i)!, topkWeights: weighted.flatMap { a.part($0, i) }) },
                                  into: (0..<r).map { CombineOutput(tokens: a.part("out", $0)!) })
                try group.dispatch(handle, (0..<r).map(a.dispatchInput), into: (0..<r).map(a.dispatchOutput), direction: .backward)
                if ht {
                    try group.combine(handle, (0..<r).map { CombineInput(expertOutputs: a.part("y", $0)!, weightGradients: a.part("gradIn", $0)) },
                                      into: (0..<r).map { CombineOutput(tokens: a.part("out", $0)!, topkWeightGradients: a.part("gradOut", $0)) },
                                      direction: .backward)
                }
            }
            let stacked = try Self.launched(mock) {
                try group.dispatch(handle, stacked: a.stackedDispatch(tokens: b, routing: true))
                try group.combine(handle, stacked: StackedCombine(expertOutputs: a.stacked["y"]!, topkWeights: weighted.flatMap { a.stacked[$0] },
                                                                  combined: a.stacked["out"]!))
                try group.dispatch(handle, stacked: a.stackedDispatch(tokens: b, routing: false), direction: .backward)
                if ht {
                    try group.combine(handle, stacked: StackedCombine(expertOutputs: a.stacked["y"]!, weightGradients: a.stacked["gradIn"],
                                                                      combined: a.stacked["out"]!, topkWeightGradients: a.stacked["gradOut"]),
                                      direction: .backward)
                }
            }
            #expect(perRank.count == (ht ? 5 : 3), "\(name)")
            #expect(stacked.count == perRank.count, "\(name)")
            for (i, (expected, got)) in zip(perRank, stacked).enumerated() {
                // The 8-byte words that differ, as (rank, field) of the block.
                let words = stride(from: 0, to: expected.count, by: 8).map { $0 / 8 }.filter { expected[$0 * 8..<$0 * 8 + 8] != got[$0 * 8..<$0 * 8 + 8] }
                let fields = words.map { w in w < RankField.allCases.count * config.ranks
                    ? "rank \(w / RankField.allCases.count) \(RankField(rawValue: w % RankField.allCases.count)!)" : "launch word \(w)" }
                #expect(fields.isEmpty, "\(name): launch \(i)'s argument block differs at \(fields)")
            }
            handle.release()
        }
    }

    /// LL: update + dispatch in one call is one launch of the fused kernel, with the argument
    /// block the separate dispatch launches (the update reads nothing else); with
    /// `tuning.fusesUpdate` off, or per-rank launches, it is the two separate launches.
    @Test(arguments: [0, 1, 4])
    func updateAndDispatchIsOneLaunchWithTheDispatchsArguments(_ index: Int) throws {
        let (name, config) = Self.cases[index]
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let b = config.maxTokensPerRank - 1, r = config.ranks
            let a = try Arrays(config, tokens: b, device: device)
            func steps(_ group: VirtualGPUGroup, mode: LaunchMode = .single) throws -> (fused: [[UInt8]], separate: [[UInt8]], kernels: [String]) {
                mock.captureParameterBytes = StepArguments.rankBytes * config.ranks + LaunchField.allCases.count * 8
                let handle = try group.makeHandle()
                defer { handle.release() }
                let idx = (0..<r).map { a.part("idx", $0)! }
                let first = mock.launchedKernels.count
                let fused = try Self.launched(mock) {
                    try group.dispatch(handle, topkIdx: idx, (0..<r).map(a.dispatchInput), into: (0..<r).map(a.dispatchOutput),
                                       options: .init(nil, mode: mode))
                }
                let kernels = Array(mock.launchedKernels[first...])
                let separate = try Self.launched(mock) {
                    try group.update(handle, topkIdx: idx, options: .init(nil, mode: mode))
                    try group.dispatch(handle, (0..<r).map(a.dispatchInput), into: (0..<r).map(a.dispatchOutput), options: .init(nil, mode: mode))
                }
                return (fused, separate, kernels)
            }
            let fusing = try steps(VirtualGPUGroup(config, device: device))
            #expect(fusing.kernels == ["ep_ll_update_dispatch"], "\(name)")
            #expect(fusing.separate.count == 2)
            #expect(fusing.fused == [fusing.separate[1]], "\(name): the fused launch's argument block is the dispatch's")

            let off = try steps(VirtualGPUGroup(config, device: device, tuning: GPUTuning(fusesUpdate: false)))
            #expect(off.kernels == ["ep_ll_update", "ep_ll_dispatch"], "\(name)")
            #expect(off.fused == off.separate)
            let perRankLaunches = try steps(VirtualGPUGroup(config, device: device), mode: .perRank)
            #expect(perRankLaunches.kernels == Array(repeating: "ep_ll_update", count: r) + Array(repeating: "ep_ll_dispatch", count: r), "\(name)")
        }
    }

    /// The C entry points reach the same launches, and name a bad argument without launching.
    @Test func theCEntryPointsLaunchTheSameAndRefuseBadArguments() throws {
        let config = Self.cases[1].1
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let object = GroupObject(config: config, backend: try GPUBackend(VirtualGPUGroup(config, device: device)))
            let group = groupRegistry.add(object)
            defer { _ = cGroupDestroy(group) }
            mock.captureParameterBytes = StepArguments.rankBytes * config.ranks + LaunchField.allCases.count * 8
            let b = 2
            let a = try Arrays(config, tokens: b, device: device)
            func c(_ name: String) -> epStacked_t {
                guard let t = a.stacked[name] else { return epStacked_t() }
                return epStacked_t(data: UnsafeMutableRawPointer(bitPattern: UInt(t.address)), dtype: ABIEnum.dataType(t.dtype), device: 0, rankStride: 0)
            }
            var call = epStackedDispatch_t()
            call.structSize = epStackedDispatch_t.abiSize
            call.tokens = Int64(b)
            call.topkIdx = c("idx")
            call.inputTokens = c("x")
            call.topkWeights = c("w")
            call.receivedTokens = c("recv")
            call.receivedTopkIdx = c("recvIdx")
            call.receivedTopkWeights = c("recvW")
            call.expertCounts = c("counts")
            call.expertSourceCounts = c("sources")
            var combine = epStackedCombine_t()
            combine.structSize = epStackedCombine_t.abiSize
            combine.expertOutputs = c("y")
            combine.combinedTokens = c("out")
            let viaC = Self.launched(mock) {
                #expect(cGroupDispatchStacked(group, &call, nil) == epSuccess)
                #expect(cGroupCombineStacked(group, &combine, nil) == epSuccess)
            }
            let backend = try object.withBackend { $0 as! GPUBackend }
            let direct = try Self.launched(mock) {
                try backend.group.dispatch(backend.handle, stacked: a.stackedDispatch(tokens: b, routing: true))
                try backend.group.combine(backend.handle, stacked: StackedCombine(expertOutputs: a.stacked["y"]!, combined: a.stacked["out"]!))
            }
            #expect(viaC.count == 2)   // the fused update + dispatch, the combine
            #expect(viaC == direct)

            // Refused, each naming its field and bound, and launching nothing.
            func refused(_ change: (inout epStackedDispatch_t) -> Void, _ message: String) {
                var bad = call
                change(&bad)
                let before = mock.launches
                #expect(cGroupDispatchStacked(group, &bad, nil) == epInvalidArgument, "\(message)")
                let text = String(cString: cGetLastErrorMessage())
                #expect(text.contains(message), "\(text)")
                #expect(mock.launches == before)
            }
            refused({ $0.tokens = 5 }, "call.tokens = 5")
            refused({ $0.tokens = -1 }, "call.tokens = -1")
            refused({ $0.topkIdx.dtype = epFloat32 }, "call.topkIdx.dtype = epFloat32; must be epInt32 or epInt64")
            refused({ $0.inputTokens.data = nil }, "call.inputTokens.data = NULL; must not be NULL")
            refused({ $0.inputTokens.dtype = epFloat16 }, "call.inputTokens.dtype = epFloat16; must be epBFloat16")
            refused({ $0.inputTokens.rankStride = 64 }, "call.inputTokens.rankStride = 64")
            refused({ $0.inputTokens.rankStride = 2 * 64 * 2 + 4 }, "must be a multiple of 8")
            refused({ $0.receivedTokens.data = $0.receivedTokens.data.map { $0 + 2 } }, "call.receivedTokens.data")
            refused({ $0.receivedTokens.device = -1 }, "call.receivedTokens.device = -1 (host); must be 0")
            refused({ $0.receivedTokens.device = -7 }, "call.receivedTokens.device = -7")
            refused({ $0.topkWeights.data = nil }, "call.topkWeights = NULL")
            refused({ $0.expertCounts.rankStride = 1 << 62 }, "call.expertCounts.rankStride")
            refused({ $0.structSize = 8 }, "call.structSize = 8")
            refused({ $0.receivedTopkIdx.data = UnsafeMutableRawPointer(bitPattern: UInt.max - 15) }, "call.receivedTopkIdx.data")
            // A combine's refusals name epStackedCombine_t's fields too.
            for (change, message) in [({ (c: inout epStackedCombine_t) in c.combinedTokens.dtype = epFloat32 }, "call.combinedTokens.dtype = epFloat32; must be epBFloat16"),
                                      ({ $0.combinedTokens.rankStride = 2 }, "call.combinedTokens.rankStride = 2"),
                                      ({ $0.expertOutputs.data = nil }, "call.expertOutputs.data = NULL; must not be NULL")] {
                var bad = combine
                change(&bad)
                #expect(cGroupCombineStacked(group, &bad, nil) == epInvalidArgument, "\(message)")
                let text = String(cString: cGetLastErrorMessage())
                #expect(text.contains(message), "\(text)")
            }
            // None of the refusals touched the step: its combine still runs.
            let before = mock.launches
            #expect(cGroupCombineStacked(group, &combine, nil) == epSuccess)
            #expect(mock.launches == before + 1)
        }
    }
}
