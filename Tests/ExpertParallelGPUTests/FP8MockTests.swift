import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// The GPU layer's FP8 checks, without a GPU (the mock driver of MockCUDA.swift): FP8 groups are
/// accepted and compile one FP8 kernel variant; scales that are missing, misaligned or of the
/// wrong type, and e4m3 rows given to combine, are named errors and launch nothing.
struct FP8MockTests {
    static func config(_ source: FP8Dispatch.Source, _ mode: FP8ScaleMode = .ue8m0Block128, layout: Layout = .expertMajor) -> GroupConfig {
        GroupConfig(algorithm: layout == .expertMajor || layout == .rankMajor ? .lowLatency : .highThroughput, ranks: 2, experts: 4, topK: 2,
                    hidden: 256, elementType: .bf16, maxTokensPerRank: 2, layout: layout, fp8: FP8Dispatch(scales: mode, source: source))
    }

    /// One FP8 step's device tensors: rows as the source gives them, scales, outputs.
    struct Step {
        var idx: [DeviceTensor] = [], x: [DeviceTensor] = [], w: [DeviceTensor] = [], scales: [DeviceTensor] = []
        var received: [DeviceTensor] = [], receivedScales: [DeviceTensor] = [], y: [DeviceTensor] = [], combined: [DeviceTensor] = []

        init(_ config: GroupConfig, device: GPUDevice) throws(EPError) {
            let words = config.fp8Format!.scaleWordsPerRow
            for rank in 0..<config.ranks {
                let ids = try DeviceTensor(.i32, [2, config.topK], on: device)
                let routing: [Int32] = [0, 3, Int32(rank + 1), -1]
                routing.withUnsafeBytes { _ = try? ids.upload($0.baseAddress!) }
                idx.append(ids)
                x.append(try DeviceTensor(config.dispatchInputType, [2, config.hidden], on: device))
                w.append(try DeviceTensor(.f32, [2, config.topK], on: device))
                scales.append(try DeviceTensor(config.fp8!.scaleType, [2, words], on: device))
                received.append(try DeviceTensor(.e4m3, config.receiveShape, on: device))
                receivedScales.append(try DeviceTensor(config.fp8!.scaleType, config.receiveScalesShape!, on: device))
                y.append(try DeviceTensor(config.elementType, config.receiveShape, on: device))
                combined.append(try DeviceTensor(config.elementType, [2, config.hidden], on: device))
            }
        }

        func inputs(_ config: GroupConfig) -> [DispatchInput] {
            (0..<config.ranks).map {
                DispatchInput(tokens: x[$0].ref, topkWeights: w[$0].ref, scales: config.fp8!.source == .passThrough ? scales[$0].ref : nil)
            }
        }
        var outputs: [DispatchOutput] { (0..<received.count).map { DispatchOutput(tokens: received[$0].ref, scales: receivedScales[$0].ref) } }
    }

    @Test(arguments: [FP8Dispatch.Source.quantize, .passThrough])
    func anFP8GroupDispatchesAndCombinesOverTheMock(source: FP8Dispatch.Source) throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let config = Self.config(source)
            let group = try VirtualGPUGroup(config, device: device)
            let step = try Step(config, device: device)
            try group.update(topkIdx: step.idx.map(\.ref))
            try group.dispatch(step.inputs(config), into: step.outputs)
            try group.combine((0..<2).map { CombineInput(expertOutputs: step.y[$0].ref, topkWeights: step.w[$0].ref) },
                              into: step.combined.map { CombineOutput(tokens: $0.ref) })
            try group.checkStatus()
            #expect(mock.compilations == 1, "update, dispatch and combine share one FP8 module")
            #expect(mock.launches == 3)
        }
    }

    @Test func misalignedScalesAreRefusedByNameAndLaunchNothing() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let config = Self.config(.passThrough, .float32Block128)
            let group = try VirtualGPUGroup(config, device: device)
            let step = try Step(config, device: device)
            try group.update(topkIdx: step.idx.map(\.ref))
            let launches = mock.launches
            let big = try DeviceTensor(.f32, [3, 2], on: device)
            var shifted = big.ref
            shifted.address = shifted.address! + 2
            shifted.shape = [2, 2]
            var inputs = step.inputs(config)
            inputs[1].scales = shifted
            #expect(throws: EPError.invalidArgument(field: "inputs[1].scales.address", value: "\(UInt(bitPattern: shifted.address!))",
                                                    requirement: "must be a multiple of 4 bytes")) {
                try group.dispatch(inputs, into: step.outputs)
            }
            #expect(mock.launches == launches)
        }
    }

    @Test func missingOrMistypedScalesAreNamedErrorsAndLaunchNothing() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let config = Self.config(.passThrough, layout: .expertMajorPadded(alignment: 2))
            let group = try VirtualGPUGroup(config, device: device)
            let step = try Step(config, device: device)
            let routing = try config.receiveRoutingShape.map { s in try (0..<2).map { _ in (try DeviceTensor(.i32, s, on: device), try DeviceTensor(.f32, s, on: device)) } }!
            var outputs = (0..<2).map { DispatchOutput(tokens: step.received[$0].ref, topkIdx: routing[$0].0.ref, topkWeights: routing[$0].1.ref,
                                                       scales: step.receivedScales[$0].ref) }
            try group.update(topkIdx: step.idx.map(\.ref))
            let launches = mock.launches
            var inputs = step.inputs(config)
            inputs[0].scales = nil
            #expect { try group.dispatch(inputs, into: outputs) } throws: { "\($0)".contains("inputs[0].scales") }
            inputs = step.inputs(config)
            outputs[1].scales = step.x[1].ref   // e4m3 rows where int32 scale words go
            #expect { try group.dispatch(inputs, into: outputs) } throws: { "\($0)".contains("outputs[1].scales.dtype") }
            #expect(mock.launches == launches)
        }
    }

    @Test func e4m3ExpertOutputsToCombineAreANamedError() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let config = Self.config(.quantize)
            let group = try VirtualGPUGroup(config, device: device)
            let step = try Step(config, device: device)
            try group.update(topkIdx: step.idx.map(\.ref))
            try group.dispatch(step.inputs(config), into: step.outputs)
            let launches = mock.launches
            #expect(throws: EPError.invalidArgument(field: "inputs[0].expertOutputs.dtype", value: "e4m3", requirement: "must be bf16")) {
                try group.combine((0..<2).map { CombineInput(expertOutputs: step.received[$0].ref, topkWeights: step.w[$0].ref) },
                                  into: step.combined.map { CombineOutput(tokens: $0.ref) })
            }
            #expect(mock.launches == launches)
        }
    }

    @Test func aHiddenSizeThatIsNotWholeBlocksIsRefusedAtCreation() throws {
        try MockCUDA.run { _ in
            let device = try MockCUDA.device()
            var config = Self.config(.quantize, .e8m0Block32)
            config.hidden = 80
            #expect(throws: EPError.invalidConfig(field: "hidden", value: "80", requirement: "must be a multiple of 32, the block of FP8 scale mode e8m0Block32")) {
                try VirtualGPUGroup(config, device: device)
            }
        }
    }
}
