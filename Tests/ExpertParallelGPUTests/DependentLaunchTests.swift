import CExpertParallel
import CExpertParallelShim
@testable import ExpertParallelC
import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import ExpertParallelKernels
import Foundation
import Testing

/// Programmatic dependent launches: the step kernels go through `cuLaunchKernelEx` with
/// programmatic stream serialization where the device and driver can, as plain launches where
/// they cannot or the tuning says so; and every step kernel waits
/// for the grids before it before it touches memory (over the mock driver and the kernel sources,
/// so CI checks it without a GPU; the GPU oracle suites check the bits with them on).
@Suite(.serialized)
struct DependentLaunchTests {
    @Test func theLaunchConfigHasCUDAsLayout() {
        // cuda.h (CUDA 12+): CUlaunchAttribute is 72 bytes, its value at 8; CUlaunchConfig's
        // stream, attributes and count follow seven unsigned ints.
        #expect(MemoryLayout<ep_cu_launch_attribute>.stride == 72)
        #expect(MemoryLayout<ep_cu_launch_attribute>.offset(of: \.value) == 8)
        #expect(MemoryLayout<ep_cu_launch_config>.offset(of: \.sharedMemBytes) == 24)
        #expect(MemoryLayout<ep_cu_launch_config>.offset(of: \.hStream) == 32)
        #expect(MemoryLayout<ep_cu_launch_config>.offset(of: \.attrs) == 40)
        #expect(MemoryLayout<ep_cu_launch_config>.offset(of: \.numAttrs) == 48)
        #expect(MemoryLayout<ep_cu_launch_config>.stride == 56)
        #expect(EP_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION == 6)
    }

    /// What one step (update + dispatch, combine, backward dispatch) launched: kernel names,
    /// whether each was a dependent launch, and the argument blocks.
    static func step(_ mock: MockCUDA.State, _ config: GroupConfig, device: GPUDevice, tuning: GPUTuning = GPUTuning(),
                     mode: LaunchMode = .single) throws -> (kernels: [String], dependent: [Bool], blocks: [[UInt8]]) {
        let group = try VirtualGPUGroup(config, device: device, tuning: tuning)
        let b = config.maxTokensPerRank - 1, r = config.ranks
        let a = try StackedCallMockTests.Arrays(config, tokens: b, device: device)
        let handle = try group.makeHandle()
        defer { handle.release() }
        mock.captureParameterBytes = StepArguments.rankBytes * r + LaunchField.allCases.count * 8
        let first = mock.launchedKernels.count
        let blocks = try StackedCallMockTests.launched(mock) {
            try group.dispatch(handle, topkIdx: (0..<r).map { a.part("idx", $0)! }, (0..<r).map(a.dispatchInput),
                               into: (0..<r).map(a.dispatchOutput), options: .init(nil, mode: mode))
            try group.combine(handle, (0..<r).map { i in CombineInput(expertOutputs: a.part("y", i)!, topkWeights: a.combineWeights.flatMap { a.part($0, i) }) },
                              into: (0..<r).map { CombineOutput(tokens: a.part("out", $0)!) }, options: .init(nil, mode: mode))
            try group.dispatch(handle, (0..<r).map(a.dispatchInput), into: (0..<r).map(a.dispatchOutput), direction: .backward,
                               options: .init(nil, mode: mode))
        }
        #expect(group.overlapsLaunches == (tuning.overlapsLaunches && device.launchesDependents))
        return (Array(mock.launchedKernels[first...]), Array(mock.launchedDependent[first...]), blocks)
    }

    @Test(arguments: [0, 2])
    func stepKernelsAreDependentLaunchesWhereTheDeviceCan(_ index: Int) throws {
        let (name, config) = StackedCallMockTests.cases[index]
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            #expect(device.launchesDependents, "the mock is compute capability 9.0 with a CUDA 13 driver")
            let overlapped = try Self.step(mock, config, device: device)
            #expect(overlapped.kernels.count >= 3, "\(name): \(overlapped.kernels)")
            #expect(overlapped.dependent.allSatisfy { $0 }, "\(name): \(overlapped.kernels) \(overlapped.dependent)")

            let serial = try Self.step(mock, config, device: device, tuning: GPUTuning(overlapsLaunches: false))
            #expect(serial.kernels == overlapped.kernels, "\(name)")
            #expect(!serial.dependent.contains(true), "\(name)")
            #expect(serial.blocks.count == overlapped.blocks.count, "\(name)")

            // One launch per rank on the ranks' streams, joined by events: plain launches.
            let perRank = try Self.step(mock, config, device: device, mode: .perRank)
            #expect(perRank.kernels.count >= overlapped.kernels.count * config.ranks, "\(name)")
            #expect(!perRank.dependent.contains(true), "\(name)")

            // A driver without cuLaunchKernelEx: plain launches, the same kernels.
            let older = try MockCUDA.device(leaving: ["cuLaunchKernelEx"])
            #expect(!older.launchesDependents)
            let plain = try Self.step(mock, config, device: older)
            #expect(plain.kernels == overlapped.kernels && !plain.dependent.contains(true), "\(name)")
        }
    }

    /// C `epGPUTuning_t.launches` (ABI 6, v5's reserved field): 0 the default (dependent), 1
    /// dependent, 2 plain, anything else a named error.
    @Test func theCTuningChoosesTheLaunches() throws {
        func tuning(_ launches: Int32) throws -> GPUTuning {
            var c = epGPUTuning_t()
            c.launches = launches
            return try GPUTuning(c, "tuning")
        }
        #expect(try tuning(0).overlapsLaunches == GPUTuning().overlapsLaunches)
        #expect(try tuning(0).overlapsLaunches)
        #expect(try tuning(1).overlapsLaunches)
        #expect(try !tuning(2).overlapsLaunches)
        for bad: Int32 in [3, -1] {
            #expect(throws: EPError.self) { try tuning(bad) }
        }
    }

    @Test func olderDevicesAndDriversLaunchPlainly() throws {
        try MockCUDA.run { _ in
            let device = try MockCUDA.device()
            #expect(StepEngine.overlapsLaunches(GPUTuning(), device: device, placement: .virtualRanks(rankStreams: [], joinEvents: [])))
            #expect(!StepEngine.overlapsLaunches(GPUTuning(overlapsLaunches: false), device: device,
                                                 placement: .virtualRanks(rankStreams: [], joinEvents: [])))
            #expect(!StepEngine.overlapsLaunches(GPUTuning(), device: device, placement: .process(rank: 0)), "NCCL ranks: plain for now")
            let driver = device.driver
            #expect(driver.launchesDependents(computeCapabilityMajor: 9))
            #expect(!driver.launchesDependents(computeCapabilityMajor: 8), "griddepcontrol needs sm_90")
        }
    }

    /// Every step kernel (one taking `const EpArgs`) starts with `ep_grid_dependency()`: a
    /// dependent launch's blocks may start while the kernel before it runs, so nothing may read
    /// or write global memory before that wait.
    @Test func everyStepKernelWaitsForThePreviousGridFirst() throws {
        var kernels: [String] = []
        for name in ["ep_ll", "ep_ht"] {
            let lines = KernelSource.embedded(name).text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
            for (i, line) in lines.enumerated() where line.hasSuffix("(const EpArgs args) {") && i > 0 && lines[i - 1].contains("__global__") {
                let kernel = String(line.prefix { $0 != "(" })
                kernels.append(kernel)
                let first = lines[(i + 1)...].first { !$0.trimmingCharacters(in: .whitespaces).isEmpty }?.trimmingCharacters(in: .whitespaces)
                #expect(first == "ep_grid_dependency();", "\(name).cu: \(kernel) starts with \(first ?? "nothing")")
            }
        }
        #expect(kernels.count >= 11, "\(kernels)")
        #expect(KernelSource.prelude.contains("griddepcontrol.wait"))
    }
}
