import CExpertParallelShim
import ExpertParallelCUDA
import ExpertParallelKernels
@testable import ExpertParallelGPU
import Foundation

/// A mock CUDA driver, NVRTC and NCCL: tables of C functions (`DynamicLibrary(name:symbols:)`)
/// that behave like a one-GPU machine, where "device memory" is host memory, launches do
/// nothing, and any call can be made to fail with a chosen code. Every allocation, stream,
/// event, module and NCCL buffer is counted, so a test can check that a failure leaks nothing.
///
/// C function pointers carry no context, so the functions read one process-wide state;
/// `MockCUDA.run` gives a test that state to itself (tests using it run one at a time).
enum MockCUDA {
    /// What the mock functions do and what they have done. Locked: the GPU layer may call from
    /// several threads.
    final class State: @unchecked Sendable {
        private let lock = NSLock()
        /// Live device allocations (cuMemAlloc), address → bytes.
        private(set) var deviceMemory: [UInt64: Int] = [:]
        private(set) var allocationCalls = 0
        /// Live NCCL allocations (ncclMemAlloc).
        private(set) var ncclMemory: Set<UInt64> = []
        private(set) var ncclAllocationCalls = 0
        private(set) var streams: Set<UInt> = []
        private(set) var events: Set<UInt> = []
        private(set) var modules: Set<UInt> = []
        private(set) var launches = 0
        private(set) var compilations = 0
        private var nextHandle: UInt = 0x10_000

        /// The n-th cuMemAlloc (1-based, counted from `reset`) fails with CUDA_ERROR_OUT_OF_MEMORY.
        var failAllocation: Int?
        /// What cuLaunchKernel returns.
        var launchResult: Int32 = 0
        /// When > 0: each launch's first kernel parameter, this many bytes of it, is kept in
        /// `launchedParameters` (the step kernels' one parameter is the argument block).
        var captureParameterBytes = 0
        private(set) var launchedParameters: [[UInt8]] = []
        /// The name of each launched kernel (cuModuleGetFunction gives each name its own handle).
        private(set) var launchedKernels: [String] = []
        /// For each launch: whether it went through cuLaunchKernelEx with programmatic stream
        /// serialization allowed (a programmatic dependent launch).
        private(set) var launchedDependent: [Bool] = []
        /// Each launch's grid (x, y): blocks per rank and ranks of a step kernel's launch.
        private(set) var launchedGrids: [(x: UInt32, y: UInt32)] = []
        private var functionNames: [UInt: String] = [:]
        /// What nvrtcCompileProgram returns (6: NVRTC_ERROR_COMPILATION).
        var compileResult: Int32 = 0
        /// The n-th ncclMemAlloc (1-based) fails with ncclUnhandledCudaError.
        var failNCCLAllocation: Int?
        /// What ncclCommWindowRegister returns.
        var windowRegisterResult: Int32 = 0

        func locked<T>(_ body: (State) throws -> T) rethrows -> T {
            lock.lock()
            defer { lock.unlock() }
            return try body(self)
        }

        func reset() {
            locked { s in
                for (address, _) in s.deviceMemory { free(UnsafeMutableRawPointer(bitPattern: UInt(address))) }
                for address in s.ncclMemory { free(UnsafeMutableRawPointer(bitPattern: UInt(address))) }
                s.deviceMemory = [:]
                s.ncclMemory = []
                s.allocationCalls = 0
                s.ncclAllocationCalls = 0
                s.streams = []
                s.events = []
                s.modules = []
                s.launches = 0
                s.compilations = 0
                s.failAllocation = nil
                s.launchResult = 0
                s.captureParameterBytes = 0
                s.launchedParameters = []
                s.launchedKernels = []
                s.launchedDependent = []
                s.launchedGrids = []
                s.functionNames = [:]
                s.compileResult = 0
                s.failNCCLAllocation = nil
                s.windowRegisterResult = 0
            }
            MockNCCLWorld.reset()
        }

        fileprivate func handle() -> UInt { nextHandle += 16; return nextHandle }

        fileprivate func allocate(_ bytes: Int) -> UInt64? {
            locked { s in
                s.allocationCalls += 1
                if s.allocationCalls == s.failAllocation { return nil }
                let address = UInt64(UInt(bitPattern: malloc(max(bytes, 1))))
                s.deviceMemory[address] = bytes
                return address
            }
        }

        fileprivate func release(device address: UInt64) -> Bool {
            locked { s in
                guard s.deviceMemory.removeValue(forKey: address) != nil else { return false }
                free(UnsafeMutableRawPointer(bitPattern: UInt(address)))
                return true
            }
        }

        fileprivate func allocateNCCL(_ bytes: Int) -> UInt64? {
            locked { s in
                s.ncclAllocationCalls += 1
                if s.ncclAllocationCalls == s.failNCCLAllocation { return nil }
                let address = UInt64(UInt(bitPattern: malloc(max(bytes, 1))))
                s.ncclMemory.insert(address)
                return address
            }
        }

        fileprivate func freeNCCL(_ address: UInt64) -> Bool {
            locked { s in
                guard s.ncclMemory.remove(address) != nil else { return false }
                free(UnsafeMutableRawPointer(bitPattern: UInt(address)))
                return true
            }
        }

        enum Kind { case stream, event, module }

        private func handles(_ kind: Kind) -> ReferenceWritableKeyPath<State, Set<UInt>> {
            switch kind {
            case .stream: \.streams
            case .event: \.events
            case .module: \.modules
            }
        }

        fileprivate func create(_ kind: Kind) -> OpaquePointer? {
            locked { s in
                let h = s.handle()
                s[keyPath: s.handles(kind)].insert(h)
                return OpaquePointer(bitPattern: h)
            }
        }

        fileprivate func destroy(_ kind: Kind, _ handle: OpaquePointer?) -> Int32 {
            locked { s in s[keyPath: s.handles(kind)].remove(UInt(bitPattern: handle)) != nil ? 0 : 400 }   // CUDA_ERROR_INVALID_HANDLE
        }

        fileprivate func function(named name: String) -> OpaquePointer? {
            locked { s in
                if let (handle, _) = s.functionNames.first(where: { $0.value == name }) { return OpaquePointer(bitPattern: handle) }
                let h = s.handle()
                s.functionNames[h] = name
                return OpaquePointer(bitPattern: h)
            }
        }

        fileprivate func launch(_ function: OpaquePointer?, _ parameters: UnsafeMutablePointer<UnsafeMutableRawPointer?>? = nil,
                                dependent: Bool = false, grid: (x: UInt32, y: UInt32) = (0, 0)) -> Int32 {
            locked { s in
                s.launches += 1
                s.launchedGrids.append(grid)
                s.launchedKernels.append(s.functionNames[UInt(bitPattern: function)] ?? "?")
                s.launchedDependent.append(dependent)
                if s.captureParameterBytes > 0, let first = parameters?.pointee {
                    s.launchedParameters.append(Array(UnsafeRawBufferPointer(start: first, count: s.captureParameterBytes)))
                }
                return s.launchResult
            }
        }
        fileprivate func compile() -> Int32 { locked { s in s.compilations += 1; return s.compileResult } }
    }

    static let state = State()
    private static let exclusive = NSLock()

    /// Runs `body` with the mock to itself, from a reset state.
    static func run<T>(_ body: (State) throws -> T) rethrows -> T {
        exclusive.lock()
        defer { state.reset(); exclusive.unlock() }
        state.reset()
        return try body(state)
    }

    /// A driver, NVRTC and NCCL over the mock tables, and a device opened through them
    /// (an sm_90 GPU with 132 SMs; kernels "compiled" without a disk cache); `leaving` names
    /// driver symbols to leave out (an older driver).
    static func device(leaving missing: Set<String> = []) throws -> GPUDevice {
        let driver = try DriverLibrary(library: DynamicLibrary(name: DriverLibrary.libraryName, symbols: driverSymbols().filter { !missing.contains($0.key) }))
        let compiler = KernelCompiler(nvrtc: try nvrtc(), cache: nil)
        return try GPUDevice(driver: driver, compiler: compiler)
    }

    static func nvrtc() throws -> NVRTCLibrary {
        try NVRTCLibrary(library: DynamicLibrary(name: NVRTCLibrary.libraryName, symbols: nvrtcSymbols()))
    }

    /// `peerPointers`: an NCCL that says where a peer's window is mapped (2.29's
    /// `ncclGetPeerDevicePointer`: the peer's own buffer for MockNCCLWorld's communicators,
    /// "unreachable" for others): a group of one rank then maps its own buffers only, and one of
    /// several ranks its peers' where they are, which the mock can build (the descriptor exchange
    /// it cannot).
    static func nccl(peerPointers: Bool = false) throws -> NCCLLibrary {
        var symbols = ncclSymbols()
        if peerPointers {
            symbols["ncclGetPeerDevicePointer"] = symbol({ window, offset, peer, out in
                out?.pointee = MockNCCLWorld.peerPointer(window, offset: offset, peer: Int(peer))
                return 0
            } as @convention(c) (OpaquePointer?, Int, Int32, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Int32)
        }
        return try NCCLLibrary(library: DynamicLibrary(name: NCCLLibrary.libraryName, symbols: symbols))
    }

    // MARK: - The tables

    private static func symbol<F>(_ function: F) -> UnsafeRawPointer { unsafeBitCast(function, to: UnsafeRawPointer.self) }

    /// Names for the codes the mock returns (cuGetErrorName hands out static strings).
    nonisolated(unsafe) private static let driverNames: [Int32: UnsafePointer<CChar>] = ([
        0: "CUDA_SUCCESS", 1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY", 400: "CUDA_ERROR_INVALID_HANDLE",
        500: "CUDA_ERROR_NOT_FOUND", 701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", 719: "CUDA_ERROR_LAUNCH_FAILED",
    ] as [Int32: String]).mapValues { UnsafePointer(strdup($0)!) }

    nonisolated(unsafe) private static let nvrtcNames: [Int32: UnsafePointer<CChar>] = ([
        0: "NVRTC_SUCCESS", 6: "NVRTC_ERROR_COMPILATION", 3: "NVRTC_ERROR_INVALID_INPUT",
    ] as [Int32: String]).mapValues { UnsafePointer(strdup($0)!) }

    nonisolated(unsafe) private static let ncclSentence = UnsafePointer(strdup("mock NCCL failure")!)
    nonisolated(unsafe) private static let compileLog = UnsafePointer(strdup("ep_ll.cu(1): error: mock compilation failure")!)
    static let cubin: [UInt8] = Array("MOCK CUBIN IMAGE".utf8)

    /// Mock device memory is host memory at the device address.
    static func at(_ address: UInt64) -> UnsafeMutableRawPointer? { UnsafeMutableRawPointer(bitPattern: UInt(address)) }

    static func copy(_ destination: UnsafeMutableRawPointer?, _ source: UnsafeRawPointer?, _ count: Int) -> Int32 {
        guard count > 0 else { return 0 }
        guard let destination, let source else { return 1 }   // CUDA_ERROR_INVALID_VALUE
        memcpy(destination, source, count)
        return 0
    }

    static func fill(_ destination: UnsafeMutableRawPointer?, _ value: UInt8, _ count: Int) -> Int32 {
        guard count > 0 else { return 0 }
        guard let destination else { return 1 }
        memset(destination, Int32(value), count)
        return 0
    }

    typealias HandleOut = UnsafeMutablePointer<OpaquePointer?>?

    static func driverSymbols() -> [String: UnsafeRawPointer] {
        var t: [String: UnsafeRawPointer] = [:]
        t["cuGetErrorName"] = symbol({ code, out in
            guard let name = MockCUDA.driverNames[code] else { return 1 }
            out?.pointee = name
            return 0
        } as @convention(c) (Int32, UnsafeMutablePointer<UnsafePointer<CChar>?>?) -> Int32)
        t["cuGetErrorString"] = symbol({ code, out in
            guard let name = MockCUDA.driverNames[code] else { return 1 }
            out?.pointee = name
            return 0
        } as @convention(c) (Int32, UnsafeMutablePointer<UnsafePointer<CChar>?>?) -> Int32)
        t["cuInit"] = symbol({ _ in 0 } as @convention(c) (UInt32) -> Int32)
        t["cuDriverGetVersion"] = symbol({ $0?.pointee = 13000; return 0 } as @convention(c) (UnsafeMutablePointer<Int32>?) -> Int32)

        t["cuDeviceGet"] = symbol({ out, ordinal in out?.pointee = ordinal; return 0 } as @convention(c) (UnsafeMutablePointer<Int32>?, Int32) -> Int32)
        t["cuDeviceGetCount"] = symbol({ $0?.pointee = 1; return 0 } as @convention(c) (UnsafeMutablePointer<Int32>?) -> Int32)
        t["cuDeviceGetName"] = symbol({ buffer, length, _ in
            guard let buffer else { return 1 }
            _ = strncpy(buffer, "Mock GPU", Int(length))
            return 0
        } as @convention(c) (UnsafeMutablePointer<CChar>?, Int32, Int32) -> Int32)
        t["cuDeviceGetAttribute"] = symbol({ out, attribute, _ in
            let values: [Int32: Int32] = [
                DeviceAttribute.multiprocessorCount.rawValue: 132, DeviceAttribute.computeCapabilityMajor.rawValue: 9,
                DeviceAttribute.computeCapabilityMinor.rawValue: 0, DeviceAttribute.maxThreadsPerBlock.rawValue: 1024,
                DeviceAttribute.warpSize.rawValue: 32, DeviceAttribute.maxSharedMemoryPerBlockOptin.rawValue: 232_448,
                DeviceAttribute.maxSharedMemoryPerMultiprocessor.rawValue: 233_472,
            ]
            out?.pointee = values[attribute] ?? 1
            return 0
        } as @convention(c) (UnsafeMutablePointer<Int32>?, Int32, Int32) -> Int32)
        t["cuDeviceTotalMem_v2"] = symbol({ out, _ in out?.pointee = 80 << 30; return 0 } as @convention(c) (UnsafeMutablePointer<Int>?, Int32) -> Int32)
        t["cuDeviceGetPCIBusId"] = symbol({ buffer, length, _ in
            guard let buffer else { return 1 }
            _ = strncpy(buffer, "0000:00:00.0", Int(length))
            return 0
        } as @convention(c) (UnsafeMutablePointer<CChar>?, Int32, Int32) -> Int32)

        t["cuDevicePrimaryCtxRetain"] = symbol({ out, _ in out?.pointee = OpaquePointer(bitPattern: 0xC0_0000); return 0 } as @convention(c) (HandleOut, Int32) -> Int32)
        t["cuDevicePrimaryCtxRelease_v2"] = symbol({ _ in 0 } as @convention(c) (Int32) -> Int32)
        t["cuCtxSetCurrent"] = symbol({ _ in 0 } as @convention(c) (OpaquePointer?) -> Int32)
        t["cuCtxGetCurrent"] = symbol({ $0?.pointee = OpaquePointer(bitPattern: 0xC0_0000); return 0 } as @convention(c) (HandleOut) -> Int32)
        t["cuCtxSynchronize"] = symbol({ () in 0 } as @convention(c) () -> Int32)

        t["cuMemGetInfo_v2"] = symbol({ free, total in free?.pointee = 80 << 30; total?.pointee = 80 << 30; return 0 } as @convention(c) (UnsafeMutablePointer<Int>?, UnsafeMutablePointer<Int>?) -> Int32)
        t["cuMemAlloc_v2"] = symbol({ out, bytes in
            guard let address = MockCUDA.state.allocate(bytes) else { return 2 }
            out?.pointee = address
            return 0
        } as @convention(c) (UnsafeMutablePointer<UInt64>?, Int) -> Int32)
        t["cuMemFree_v2"] = symbol({ MockCUDA.state.release(device: $0) ? 0 : 1 } as @convention(c) (UInt64) -> Int32)
        t["cuMemAllocHost_v2"] = symbol({ out, bytes in out?.pointee = malloc(max(bytes, 1)); return 0 } as @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>?, Int) -> Int32)
        t["cuMemFreeHost"] = symbol({ free($0); return 0 } as @convention(c) (UnsafeMutableRawPointer?) -> Int32)
        // Device memory is host memory: copies and fills really happen.
        t["cuMemcpyHtoD_v2"] = symbol({ d, s, n in MockCUDA.copy(MockCUDA.at(d), s, n) } as @convention(c) (UInt64, UnsafeRawPointer?, Int) -> Int32)
        t["cuMemcpyDtoH_v2"] = symbol({ d, s, n in MockCUDA.copy(d, MockCUDA.at(s), n) } as @convention(c) (UnsafeMutableRawPointer?, UInt64, Int) -> Int32)
        t["cuMemcpyDtoD_v2"] = symbol({ d, s, n in MockCUDA.copy(MockCUDA.at(d), MockCUDA.at(s), n) } as @convention(c) (UInt64, UInt64, Int) -> Int32)
        t["cuMemcpyHtoDAsync_v2"] = symbol({ d, s, n, _ in MockCUDA.copy(MockCUDA.at(d), s, n) } as @convention(c) (UInt64, UnsafeRawPointer?, Int, OpaquePointer?) -> Int32)
        t["cuMemcpyDtoHAsync_v2"] = symbol({ d, s, n, _ in MockCUDA.copy(d, MockCUDA.at(s), n) } as @convention(c) (UnsafeMutableRawPointer?, UInt64, Int, OpaquePointer?) -> Int32)
        t["cuMemcpyDtoDAsync_v2"] = symbol({ d, s, n, _ in MockCUDA.copy(MockCUDA.at(d), MockCUDA.at(s), n) } as @convention(c) (UInt64, UInt64, Int, OpaquePointer?) -> Int32)
        t["cuMemsetD8_v2"] = symbol({ d, v, n in MockCUDA.fill(MockCUDA.at(d), v, n) } as @convention(c) (UInt64, UInt8, Int) -> Int32)
        t["cuMemsetD8Async"] = symbol({ d, v, n, _ in MockCUDA.fill(MockCUDA.at(d), v, n) } as @convention(c) (UInt64, UInt8, Int, OpaquePointer?) -> Int32)

        t["cuStreamCreate"] = symbol({ out, _ in out?.pointee = MockCUDA.state.create(.stream); return 0 } as @convention(c) (HandleOut, UInt32) -> Int32)
        t["cuStreamSynchronize"] = symbol({ _ in 0 } as @convention(c) (OpaquePointer?) -> Int32)
        t["cuStreamDestroy_v2"] = symbol({ MockCUDA.state.destroy(.stream, $0) } as @convention(c) (OpaquePointer?) -> Int32)
        t["cuStreamWaitEvent"] = symbol({ _, _, _ in 0 } as @convention(c) (OpaquePointer?, OpaquePointer?, UInt32) -> Int32)

        t["cuEventCreate"] = symbol({ out, _ in out?.pointee = MockCUDA.state.create(.event); return 0 } as @convention(c) (HandleOut, UInt32) -> Int32)
        t["cuEventRecord"] = symbol({ _, _ in 0 } as @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32)
        t["cuEventSynchronize"] = symbol({ _ in 0 } as @convention(c) (OpaquePointer?) -> Int32)
        t["cuEventQuery"] = symbol({ _ in 0 } as @convention(c) (OpaquePointer?) -> Int32)
        t["cuEventElapsedTime_v2"] = symbol({ out, _, _ in out?.pointee = 0; return 0 } as @convention(c) (UnsafeMutablePointer<Float>?, OpaquePointer?, OpaquePointer?) -> Int32)
        t["cuEventDestroy_v2"] = symbol({ MockCUDA.state.destroy(.event, $0) } as @convention(c) (OpaquePointer?) -> Int32)

        t["cuModuleLoadData"] = symbol({ out, _ in out?.pointee = MockCUDA.state.create(.module); return 0 } as @convention(c) (HandleOut, UnsafeRawPointer?) -> Int32)
        t["cuModuleUnload"] = symbol({ MockCUDA.state.destroy(.module, $0) } as @convention(c) (OpaquePointer?) -> Int32)
        t["cuModuleGetFunction"] = symbol({ out, _, name in
            out?.pointee = MockCUDA.state.function(named: name.map { String(cString: $0) } ?? "")
            return 0
        } as @convention(c) (HandleOut, OpaquePointer?, UnsafePointer<CChar>?) -> Int32)
        t["cuModuleGetGlobal_v2"] = symbol({ _, _, _, _ in 500 } as @convention(c) (UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<Int>?, OpaquePointer?, UnsafePointer<CChar>?) -> Int32)
        t["cuFuncSetAttribute"] = symbol({ _, _, _ in 0 } as @convention(c) (OpaquePointer?, Int32, Int32) -> Int32)
        t["cuFuncGetAttribute"] = symbol({ out, _, _ in out?.pointee = 64; return 0 } as @convention(c) (UnsafeMutablePointer<Int32>?, Int32, OpaquePointer?) -> Int32)
        t["cuLaunchKernel"] = symbol({ function, x, y, _, _, _, _, _, _, parameters, _ in MockCUDA.state.launch(function, parameters, grid: (x, y)) } as @convention(c) (
            OpaquePointer?, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, OpaquePointer?,
            UnsafeMutablePointer<UnsafeMutableRawPointer?>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?
        ) -> Int32)
        t["cuLaunchKernelEx"] = symbol({ config, function, parameters, _ in
            guard let config else { return 1 }
            let attributes = UnsafeBufferPointer(start: config.pointee.attrs, count: Int(config.pointee.numAttrs))
            let dependent = attributes.contains {
                $0.id == UInt32(EP_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION) && $0.value.programmaticStreamSerializationAllowed != 0
            }
            return MockCUDA.state.launch(function, parameters, dependent: dependent, grid: (config.pointee.gridDimX, config.pointee.gridDimY))
        } as @convention(c) (UnsafePointer<ep_cu_launch_config>?, OpaquePointer?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?,
                             UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Int32)
        t["cuOccupancyMaxActiveBlocksPerMultiprocessor"] = symbol({ out, _, _, _ in out?.pointee = 2; return 0 } as @convention(c) (UnsafeMutablePointer<Int32>?, OpaquePointer?, Int32, Int) -> Int32)

        t["cuStreamBeginCapture_v2"] = symbol({ _, _ in 0 } as @convention(c) (OpaquePointer?, Int32) -> Int32)
        t["cuThreadExchangeStreamCaptureMode"] = symbol({ _ in 0 } as @convention(c) (UnsafeMutablePointer<Int32>?) -> Int32)
        t["cuStreamEndCapture"] = symbol({ _, out in out?.pointee = OpaquePointer(bitPattern: 0x6_0000); return 0 } as @convention(c) (OpaquePointer?, HandleOut) -> Int32)
        t["cuGraphInstantiateWithFlags"] = symbol({ out, _, _ in out?.pointee = OpaquePointer(bitPattern: 0x7_0000); return 0 } as @convention(c) (HandleOut, OpaquePointer?, UInt64) -> Int32)
        t["cuGraphLaunch"] = symbol({ _, _ in MockCUDA.state.launch(nil) } as @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32)
        t["cuGraphExecDestroy"] = symbol({ _ in 0 } as @convention(c) (OpaquePointer?) -> Int32)
        t["cuGraphDestroy"] = symbol({ _ in 0 } as @convention(c) (OpaquePointer?) -> Int32)
        return t
    }

    static func nvrtcSymbols() -> [String: UnsafeRawPointer] {
        var t: [String: UnsafeRawPointer] = [:]
        t["nvrtcGetErrorString"] = symbol({ MockCUDA.nvrtcNames[$0] } as @convention(c) (Int32) -> UnsafePointer<CChar>?)
        t["nvrtcVersion"] = symbol({ major, minor in major?.pointee = 13; minor?.pointee = 0; return 0 } as @convention(c) (UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?) -> Int32)
        t["nvrtcGetNumSupportedArchs"] = symbol({ $0?.pointee = 1; return 0 } as @convention(c) (UnsafeMutablePointer<Int32>?) -> Int32)
        t["nvrtcGetSupportedArchs"] = symbol({ $0?.pointee = 90; return 0 } as @convention(c) (UnsafeMutablePointer<Int32>?) -> Int32)
        t["nvrtcCreateProgram"] = symbol({ out, _, _, _, _, _ in out?.pointee = OpaquePointer(bitPattern: 0x9_0000); return 0 } as @convention(c) (
            UnsafeMutablePointer<OpaquePointer?>?, UnsafePointer<CChar>?, UnsafePointer<CChar>?, Int32,
            UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<UnsafePointer<CChar>?>?
        ) -> Int32)
        t["nvrtcDestroyProgram"] = symbol({ $0?.pointee = nil; return 0 } as @convention(c) (UnsafeMutablePointer<OpaquePointer?>?) -> Int32)
        t["nvrtcCompileProgram"] = symbol({ _, _, _ in MockCUDA.state.compile() } as @convention(c) (OpaquePointer?, Int32, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32)
        t["nvrtcGetPTXSize"] = symbol({ _, out in out?.pointee = MockCUDA.cubin.count + 1; return 0 } as @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>?) -> Int32)
        t["nvrtcGetPTX"] = symbol({ _, out in
            _ = MockCUDA.cubin.withUnsafeBytes { MockCUDA.copy(UnsafeMutableRawPointer(out), $0.baseAddress, $0.count) }
            out?[MockCUDA.cubin.count] = 0
            return 0
        } as @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>?) -> Int32)
        t["nvrtcGetCUBINSize"] = symbol({ _, out in out?.pointee = MockCUDA.cubin.count; return 0 } as @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>?) -> Int32)
        t["nvrtcGetCUBIN"] = symbol({ _, out in
            MockCUDA.cubin.withUnsafeBytes { MockCUDA.copy(UnsafeMutableRawPointer(out), $0.baseAddress, $0.count) }
        } as @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>?) -> Int32)
        // The log: the failure's text after a failed compilation, else empty.
        t["nvrtcGetProgramLogSize"] = symbol({ _, out in
            out?.pointee = MockCUDA.state.compileResult == 0 ? 1 : strlen(MockCUDA.compileLog) + 1
            return 0
        } as @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>?) -> Int32)
        t["nvrtcGetProgramLog"] = symbol({ _, out in
            if MockCUDA.state.compileResult == 0 { out?.pointee = 0 } else if let out { strcpy(out, MockCUDA.compileLog) }
            return 0
        } as @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>?) -> Int32)
        return t
    }

    static func ncclSymbols() -> [String: UnsafeRawPointer] {
        var t: [String: UnsafeRawPointer] = [:]
        t["ncclGetVersion"] = symbol({ $0?.pointee = 22_809; return 0 } as @convention(c) (UnsafeMutablePointer<Int32>?) -> Int32)
        t["ncclGetErrorString"] = symbol({ _ in MockCUDA.ncclSentence } as @convention(c) (Int32) -> UnsafePointer<CChar>?)
        t["ncclGetUniqueId"] = symbol({ _ in 0 } as @convention(c) (UnsafeMutableRawPointer?) -> Int32)
        // These take ncclUniqueId by value (through the C shim); the mock tests never join.
        let refuse = symbol({ () in 5 } as @convention(c) () -> Int32)
        t["ncclCommInitRank"] = refuse
        t["ncclCommInitRankConfig"] = refuse
        t["ncclCommGetAsyncError"] = symbol({ _, out in out?.pointee = 0; return 0 } as @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int32>?) -> Int32)
        t["ncclCommFinalize"] = symbol({ _ in 0 } as @convention(c) (OpaquePointer?) -> Int32)
        t["ncclCommDestroy"] = symbol({ _ in 0 } as @convention(c) (OpaquePointer?) -> Int32)
        t["ncclCommAbort"] = symbol({ _ in 0 } as @convention(c) (OpaquePointer?) -> Int32)
        // A communicator of one rank, or one of MockNCCLWorld's (several ranks, each a thread here).
        t["ncclCommCount"] = symbol({ comm, out in out?.pointee = Int32(MockNCCLWorld.decode(comm)?.ranks ?? 1); return 0 }
            as @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int32>?) -> Int32)
        t["ncclCommUserRank"] = symbol({ comm, out in out?.pointee = Int32(MockNCCLWorld.decode(comm)?.rank ?? 0); return 0 }
            as @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int32>?) -> Int32)
        // One rank: the all-gather is a copy (ncclDataType_t's sizes by value); several: they meet.
        t["ncclAllGather"] = symbol({ send, receive, count, type, comm, _ in
            let sizes = [1, 1, 4, 4, 8, 8, 2, 4, 8, 2]
            guard type >= 0, Int(type) < sizes.count else { return 4 }   // ncclInvalidArgument
            if MockNCCLWorld.decode(comm) != nil {
                return MockNCCLWorld.allGather(comm, send, receive, bytes: count * sizes[Int(type)]) ? 0 : 2   // ncclSystemError
            }
            if let send, let receive, count > 0 { memmove(receive, send, count * sizes[Int(type)]) }
            return 0
        } as @convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int, Int32, OpaquePointer?, OpaquePointer?) -> Int32)
        t["ncclMemAlloc"] = symbol({ out, bytes in
            guard let address = MockCUDA.state.allocateNCCL(bytes) else { return 1 }   // ncclUnhandledCudaError
            out?.pointee = UnsafeMutableRawPointer(bitPattern: UInt(address))
            return 0
        } as @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>?, Int) -> Int32)
        t["ncclMemFree"] = symbol({ MockCUDA.state.freeNCCL(UInt64(UInt(bitPattern: $0))) ? 0 : 4 } as @convention(c) (UnsafeMutableRawPointer?) -> Int32)
        t["ncclCommWindowRegister"] = symbol({ comm, buffer, _, out, _ in
            let result = MockCUDA.state.locked { $0.windowRegisterResult }
            guard result == 0 else { return result }
            guard let window = MockNCCLWorld.register(comm, buffer) else { return 2 }   // a rank stayed away
            out?.pointee = window
            return 0
        } as @convention(c) (OpaquePointer?, UnsafeMutableRawPointer?, Int, UnsafeMutablePointer<OpaquePointer?>?, Int32) -> Int32)
        t["ncclCommWindowDeregister"] = symbol({ _, _ in 0 } as @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32)
        return t
    }
}
