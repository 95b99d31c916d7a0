import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// The GPU layer's failure paths, without a GPU: a device opened over the mock driver, NVRTC
/// and NCCL tables (MockCUDA.swift), each made to fail one call with a chosen code. Every
/// failure must reach the caller as `EPError.lowerLayer` naming the library, the call and the
/// code, and leave nothing allocated. These run in CI (no GPU, no CUDA installed).
struct MockDriverTests {
    static let config = GroupConfig(
        algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .f32, maxTokensPerRank: 2,
        layout: .expertMajor)

    /// The failure inside `error`, or nil (recorded) when it is not `.lowerLayer`.
    private func lowerLayer(_ error: EPError?) -> BackendFailure? {
        guard case let .lowerLayer(failure)? = error else {
            Issue.record("expected EPError.lowerLayer, got \(error.map { "\($0)" } ?? "no error")")
            return nil
        }
        return failure
    }

    /// What `body` throws (the calls under test throw `EPError` only: their signatures say so).
    private func thrown<T>(_ body: () throws -> T) -> EPError? {
        do {
            _ = try body()
            return nil
        } catch let error as EPError {
            return error
        } catch {
            Issue.record("not an EPError: \(error)")
            return nil
        }
    }

    @Test func theMockDeviceOpensAndAGroupRunsAStep() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            #expect(device.name == "Mock GPU")
            #expect(device.multiprocessors == 132)
            do {
                let group = try VirtualGPUGroup(Self.config, device: device)
                let step = try Step(Self.config, device: device)
                try group.update(topkIdx: step.topkIdx.map(\.ref))
                try group.dispatch(step.dispatchInputs, into: step.dispatchOutputs)
                try group.combine(step.combineInputs, into: step.combineOutputs)
                try group.checkStatus()
                #expect(mock.compilations == 1)
                #expect(mock.launches >= 3)
                #expect(!mock.deviceMemory.isEmpty && !mock.modules.isEmpty)
            }
            // Everything the group and the tensors allocated went back with them.
            #expect(mock.deviceMemory.isEmpty, "\(mock.deviceMemory.count) allocations left")
            #expect(mock.events.isEmpty)
        }
    }

    /// Combine brings back what a dispatch of the same step sent: right after an update (and
    /// after a new update of a dispatched handle) it is `wrongOrder`, on the host, not the device.
    @Test func combineWithoutADispatchOfTheStepIsWrongOrder() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let group = try VirtualGPUGroup(Self.config, device: device)
            let step = try Step(Self.config, device: device)
            let handle = try group.makeHandle()
            let expected = EPError.wrongOrder("combine needs a dispatch of this handle's step first")
            try group.update(handle, topkIdx: step.topkIdx.map(\.ref))
            let launches = mock.launches
            #expect(throws: expected) { try group.combine(handle, step.combineInputs, into: step.combineOutputs) }
            #expect(mock.launches == launches, "a refused combine launches nothing")
            try group.dispatch(handle, step.dispatchInputs, into: step.dispatchOutputs)
            try group.combine(handle, step.combineInputs, into: step.combineOutputs)
            try group.update(handle, topkIdx: step.topkIdx.map(\.ref))
            #expect(throws: expected) { try group.combine(handle, step.combineInputs, into: step.combineOutputs) }
        }
    }

    @Test func groupCreationThatRunsOutOfMemoryNamesCuMemAllocAndLeaksNothing() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            // One creation that succeeds: how many allocations it makes, and the rank streams
            // the device keeps for every group (created once, not a leak).
            let before = mock.allocationCalls
            do { _ = try VirtualGPUGroup(Self.config, device: device) }
            let allocations = mock.allocationCalls - before
            #expect(allocations >= Self.config.ranks + 2)   // workspaces, mask, the default handle
            #expect(mock.deviceMemory.isEmpty, "a released group left \(mock.deviceMemory.count) allocations")
            #expect(mock.events.isEmpty)
            #expect(mock.streams.count == Self.config.ranks)   // the device's rank streams only
            for k in 1...allocations {
                let (memoryBefore, eventsBefore, streamsBefore) = (Set(mock.deviceMemory.keys), mock.events, mock.streams)
                mock.locked { $0.failAllocation = $0.allocationCalls + k }
                let error = thrown { try VirtualGPUGroup(Self.config, device: device) }
                let failure = try #require(lowerLayer(error))
                #expect(failure.library == .driver)
                #expect(failure.call == "cuMemAlloc")
                #expect(failure.code == 2)
                #expect(failure.name == "CUDA_ERROR_OUT_OF_MEMORY")
                #expect(error?.description == "cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY (2)")
                // A failed group leaks nothing it made before the failing allocation (workspaces, the
                // mask, its stream and join events).
                let leaked = Set(mock.deviceMemory.keys).subtracting(memoryBefore).count
                let events = mock.events.subtracting(eventsBefore).count, streams = mock.streams.subtracting(streamsBefore).count
                #expect(leaked == 0 && events == 0 && streams == 0,
                        "allocation \(k) of \(allocations) failed: left \(leaked) device allocations, \(events) events, \(streams) streams")
            }
        }
    }

    @Test func aTensorThatCannotBeAllocatedNamesCuMemAlloc() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            mock.locked { $0.failAllocation = $0.allocationCalls + 1 }
            let failure = try #require(lowerLayer(thrown { try DeviceTensor(.f32, [4, 8], on: device) }))
            #expect(failure.library == .driver && failure.call == "cuMemAlloc" && failure.code == 2)
            #expect(mock.deviceMemory.isEmpty)
        }
    }

    /// (The mock device takes dependent launches: `cuLaunchKernelEx`; a serial group `cuLaunchKernel`.)
    @Test func aLaunchFailureSurfacesFromDispatchNamingTheLaunchCall() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let group = try VirtualGPUGroup(Self.config, device: device)
            let step = try Step(Self.config, device: device)
            try group.update(topkIdx: step.topkIdx.map(\.ref))
            mock.locked { $0.launchResult = 701 }
            let error = thrown { try group.dispatch(step.dispatchInputs, into: step.dispatchOutputs) }
            let failure = try #require(lowerLayer(error))
            #expect(failure.library == .driver)
            #expect(failure.kind == .callFailed)
            #expect(failure.call == "cuLaunchKernelEx")
            #expect(failure.code == 701)
            #expect(failure.name == "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES")
            // The same from update and combine.
            let update = lowerLayer(thrown { try group.update(topkIdx: step.topkIdx.map(\.ref)) })
            #expect(update?.call == "cuLaunchKernelEx" && update?.code == 701)
            let serial = try VirtualGPUGroup(Self.config, device: device, tuning: GPUTuning(overlapsLaunches: false))
            let plain = lowerLayer(thrown { try serial.update(topkIdx: step.topkIdx.map(\.ref)) })
            #expect(plain?.call == "cuLaunchKernel" && plain?.code == 701)
        }
    }

    @Test func anNVRTCCompileFailureSurfacesFromTheFirstUpdate() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            mock.locked { $0.compileResult = 6 }
            // Creating the group compiles nothing; the first update compiles its kernels.
            let group = try VirtualGPUGroup(Self.config, device: device)
            #expect(mock.compilations == 0)
            let step = try Step(Self.config, device: device)
            let error = thrown { try group.update(topkIdx: step.topkIdx.map(\.ref)) }
            let failure = try #require(lowerLayer(error))
            #expect(failure.library == .nvrtc)
            #expect(failure.call == "nvrtcCompileProgram")
            #expect(failure.code == 6)
            #expect(failure.name == "NVRTC_ERROR_COMPILATION")
            #expect(failure.detail.contains("mock compilation failure"), "the program log: \(failure.detail)")
            #expect(mock.compilations == 1)
            #expect(mock.modules.isEmpty)
            #expect(mock.launches == 0)
        }
    }

    @Test func anNCCLAllocationFailureSurfacesTypedAndFreesTheBuffersBefore() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let nccl = try MockCUDA.nccl()
            let comm = NCCLComm(rawValue: OpaquePointer(bitPattern: 0xCC_0000)!)
            var config = Self.config
            config.ranks = 1
            config.experts = 2
            mock.locked { $0.failNCCLAllocation = 2 }   // the workspace is allocated, the first slot's rows are not
            let error = thrown { try NCCLRankGroup(config, device: device, comm: comm, nccl: nccl) }
            let failure = try #require(lowerLayer(error))
            #expect(failure.library == .nccl)
            #expect(failure.call == "ncclMemAlloc")
            #expect(failure.code == 1)
            #expect(failure.name.hasPrefix("ncclUnhandledCudaError"))
            #expect(mock.ncclAllocationCalls == 2)
            #expect(mock.ncclMemory.isEmpty, "\(mock.ncclMemory.count) NCCL buffers left")
            #expect(mock.deviceMemory.isEmpty)
            #expect(mock.streams.isEmpty)
        }
    }

    @Test func anNCCLWindowRegistrationFailureSurfacesTypedAndFreesTheBuffers() throws {
        try MockCUDA.run { mock in
            let device = try MockCUDA.device()
            let nccl = try MockCUDA.nccl()
            let comm = NCCLComm(rawValue: OpaquePointer(bitPattern: 0xCC_0000)!)
            var config = Self.config
            config.ranks = 1
            config.experts = 2
            mock.locked { $0.windowRegisterResult = 2 }   // ncclSystemError
            let failure = try #require(lowerLayer(thrown { try NCCLRankGroup(config, device: device, comm: comm, nccl: nccl) }))
            #expect(failure.library == .nccl)
            #expect(failure.call == "ncclCommWindowRegister")
            #expect(failure.code == 2)
            #expect(mock.ncclAllocationCalls > 1)
            #expect(mock.ncclMemory.isEmpty, "\(mock.ncclMemory.count) NCCL buffers left")
            #expect(mock.streams.isEmpty)
        }
    }
}

/// One step's device tensors for a virtual group: routing, tokens, weights, outputs.
private struct Step {
    var topkIdx: [DeviceTensor] = []
    var tokens: [DeviceTensor] = []
    var weights: [DeviceTensor] = []
    var received: [DeviceTensor] = []
    var combined: [DeviceTensor] = []

    init(_ config: GroupConfig, device: GPUDevice) throws(EPError) {
        for rank in 0..<config.ranks {
            let idx = try DeviceTensor(.i32, [2, config.topK], on: device)
            let routing: [Int32] = [0, Int32(config.experts - 1), Int32(rank % config.experts), -1]
            routing.withUnsafeBytes { _ = try? idx.upload($0.baseAddress!) }
            topkIdx.append(idx)
            tokens.append(try DeviceTensor(.f32, [2, config.hidden], on: device))
            weights.append(try DeviceTensor(.f32, [2, config.topK], on: device))
            received.append(try DeviceTensor(.f32, config.receiveShape, on: device))
            combined.append(try DeviceTensor(.f32, [2, config.hidden], on: device))
        }
    }

    var dispatchInputs: [DispatchInput] { zip(tokens, weights).map { DispatchInput(tokens: $0.ref, topkWeights: $1.ref) } }
    var dispatchOutputs: [DispatchOutput] { received.map { DispatchOutput(tokens: $0.ref) } }
    var combineInputs: [CombineInput] { zip(received, weights).map { CombineInput(expertOutputs: $0.ref, topkWeights: $1.ref) } }
    var combineOutputs: [CombineOutput] { combined.map { CombineOutput(tokens: $0.ref) } }
}
