import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelGPU
import Testing

/// FP8 dispatch through an NCCL rank group of one rank (the group's own e4m3 and scale buffers),
/// every layout, both sources, each scale mode, against the CPU oracle: the received zones' rows
/// and scale words, counters, and the combine after it.
@Suite(.enabled(if: gpuTestsEnabled && sharedDevice != nil && (try? NCCLLibrary.shared()) != nil, "needs a GPU and NCCL (EP_GPU_TESTS=1)"))
struct FP8NCCLOneRankTests {
    @Test(arguments: FP8OracleTests.layouts)
    func oneRankFP8MatchesTheOracle(_ layout: Layout) throws {
        for (i, source) in [FP8Dispatch.Source.quantize, .passThrough].enumerated() {
            let mode = FP8ScaleMode.allCases[(FP8OracleTests.layouts.firstIndex(of: layout)! + i) % 3]
            let config = FP8OracleTests.config(layout, ranks: 1, mode, source, maxTokens: 20)
            try withOneRankGroup(config) { group in
                let inputs = try StepInputs(fp8: config, tokens: [17], seed: UInt64(40 + i))
                let step = try OneRankStep(group, inputs)
                let handle = try group.makeHandle()
                try group.update(handle, topkIdx: [step.idx.ref])
                try step.dispatch(group, handle, slot: 1, direction: .forward)
                try step.combine(group, handle, slot: 1, direction: .forward)
                try group.checkStatus()
                let expected = try #require(try oracleStep(config, inputs)[0])
                let got = try step.result(group, handle, slot: 1, direction: .forward)
                let label = "\(layout) \(source) \(mode)"
                #expect(got.layout.expertCounters == expected.layout.expertCounters, "\(label): counters")
                let words = config.fp8Format!.scaleWordsPerRow * 4
                for (start, count) in receivedZones(config, expected.layout) {
                    let rows = (start * config.wireRowBytes)..<((start + count) * config.wireRowBytes)
                    expectSameBytes(got.received[rows], expected.received[rows], "\(label): received rows \(start)..<\(start + count)")
                    let scales = (start * words)..<((start + count) * words)
                    expectSameBytes(got.scales?[scales], expected.scales?[scales], "\(label): received scales \(start)..<\(start + count)")
                }
                expectSameBytes(got.combined, expected.combined, "\(label): combined rows")
                handle.release()
            }
        }
    }
}
