import Foundation
import Testing
import ExpertParallelCUDA

/// A `DynamicLibrary` from a table of C functions stands in for a `dlopen`ed one: the CUDA
/// layer's tables resolve from it, its functions are the ones called, and what they return is
/// reported as from the real library. (The whole mock driver, NVRTC and NCCL behind the GPU
/// layer's failure paths is Tests/ExpertParallelGPUTests/MockCUDA.swift.)
struct SymbolTableTests {
    private static func symbol<F>(_ function: F) -> UnsafeRawPointer { unsafeBitCast(function, to: UnsafeRawPointer.self) }

    nonisolated(unsafe) private static let nvrtcName = UnsafePointer(strdup("NVRTC_ERROR_INVALID_OPTION")!)
    nonisolated(unsafe) private static let ncclSentence = UnsafePointer(strdup("unhandled system error")!)

    /// A C function that must not be called (the calls under test never reach it).
    nonisolated(unsafe) private static let unused = symbol({ () in Int32(99) } as @convention(c) () -> Int32)

    @Test func aTableWithoutTheDriverEntryPointsNamesTheFirstMissing() {
        #expect(throws: CUDAError.symbolMissing(library: DriverLibrary.libraryName, symbol: "cuGetErrorName")) {
            try DriverLibrary(library: DynamicLibrary(name: DriverLibrary.libraryName, symbols: [:]))
        }
    }

    @Test func nvrtcFromATableReportsItsVersionCallsFailureByName() {
        var table: [String: UnsafeRawPointer] = [:]
        for name in [
            "nvrtcGetNumSupportedArchs", "nvrtcGetSupportedArchs", "nvrtcCreateProgram", "nvrtcDestroyProgram",
            "nvrtcCompileProgram", "nvrtcGetPTXSize", "nvrtcGetPTX", "nvrtcGetCUBINSize", "nvrtcGetCUBIN",
            "nvrtcGetProgramLogSize", "nvrtcGetProgramLog",
        ] { table[name] = Self.unused }
        table["nvrtcGetErrorString"] = Self.symbol({ $0 == 5 ? SymbolTableTests.nvrtcName : nil } as @convention(c) (Int32) -> UnsafePointer<CChar>?)
        table["nvrtcVersion"] = Self.symbol({ _, _ in 5 } as @convention(c) (UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?) -> Int32)
        #expect(throws: CUDAError.nvrtc(call: "nvrtcVersion", code: 5, name: "NVRTC_ERROR_INVALID_OPTION", log: "")) {
            try NVRTCLibrary(library: DynamicLibrary(name: NVRTCLibrary.libraryName, symbols: table))
        }
    }

    @Test func ncclFromATableReportsItsCallsFailureByName() throws {
        let table: [String: UnsafeRawPointer] = [
            "ncclGetVersion": Self.symbol({ _ in 2 } as @convention(c) (UnsafeMutablePointer<Int32>?) -> Int32),
            "ncclGetErrorString": Self.symbol({ _ in SymbolTableTests.ncclSentence } as @convention(c) (Int32) -> UnsafePointer<CChar>?),
        ]
        // The communicator and memory calls are missing: only they fail, not the version query.
        let nccl = try NCCLLibrary(library: DynamicLibrary(name: NCCLLibrary.libraryName, location: "table", symbols: table))
        #expect(nccl.location == "table")
        #expect(throws: CUDAError.nccl(call: "ncclGetVersion", code: 2, name: "ncclSystemError \"unhandled system error\"")) {
            _ = try nccl.version()
        }
        #expect(throws: CUDAError.symbolMissing(library: NCCLLibrary.libraryName, symbol: "ncclGetUniqueId")) {
            _ = try nccl.uniqueID()
        }
    }
}
