import ExpertParallel
import ExpertParallelCUDA
@testable import ExpertParallelGPU
import Testing

/// The CUDA layer's errors reach the core typed: `EPError.lowerLayer` keeps the library, call,
/// code and code name of the `CUDAError`, and reads exactly as it did.
struct TypedErrorTests {
    /// The error `gpu {}` turns `error` into.
    private func throughGPU(_ error: any Error) -> EPError {
        do {
            let _: Int = try gpu { throw error }
            Issue.record("gpu {} returned although its body threw \(error)")
            return .backend("no error")
        } catch {
            return error
        }
    }

    /// The failure inside `error`, or nil (recorded) when it is not `.lowerLayer`.
    private func lowerLayer(_ error: EPError) -> BackendFailure? {
        guard case let .lowerLayer(failure) = error else {
            Issue.record("expected EPError.lowerLayer, got \(error)")
            return nil
        }
        return failure
    }

    @Test func anNCCLCallFailureKeepsItsLibraryCallCodeAndName() throws {
        let cuda = CUDAError.nccl(call: "ncclCommInitRankConfig", code: 3, name: "ncclInternalError \"no communicator\"")
        let error = throughGPU(cuda)
        let failure = try #require(lowerLayer(error))
        #expect(failure.library == .nccl)
        #expect(failure.kind == .callFailed)
        #expect(failure.call == "ncclCommInitRankConfig")
        #expect(failure.code == 3)
        #expect(failure.name == "ncclInternalError \"no communicator\"")
        #expect(failure.detail.isEmpty)
        #expect(error.description == cuda.description)
        #expect(error.description == "ncclCommInitRankConfig failed: ncclInternalError \"no communicator\" (3)")
        #expect(error == EPError(cuda))
    }

    @Test func aDriverCallFailureKeepsItsLibraryCallCodeAndName() throws {
        let cuda = CUDAError.driver(call: "cuModuleLoadData", code: 218, name: "CUDA_ERROR_INVALID_PTX")
        let error = throughGPU(cuda)
        let failure = try #require(lowerLayer(error))
        #expect(failure == .callFailed(.driver, call: "cuModuleLoadData", code: 218, name: "CUDA_ERROR_INVALID_PTX"))
        #expect(error.description == cuda.description)
        #expect(error.description == "cuModuleLoadData failed: CUDA_ERROR_INVALID_PTX (218)")
    }

    @Test func anNVRTCFailureKeepsItsLogAndPrintsItTrimmed() throws {
        let log = "kernel.cu(3): error: identifier \"x\" is undefined\n\n1 error detected\n\0"
        let cuda = CUDAError.nvrtc(call: "nvrtcCompileProgram", code: 6, name: "NVRTC_ERROR_COMPILATION", log: log)
        let error = throughGPU(cuda)
        let failure = try #require(lowerLayer(error))
        #expect(failure.library == .nvrtc)
        #expect((failure.call, failure.code, failure.name) == ("nvrtcCompileProgram", 6, "NVRTC_ERROR_COMPILATION"))
        #expect(failure.detail == log)
        #expect(error.description == cuda.description)
        #expect(error.description.hasSuffix("(6)\nkernel.cu(3): error: identifier \"x\" is undefined\n\n1 error detected"))
    }

    @Test(arguments: [
        (NCCLLibrary.libraryName, BackendFailure.Library.nccl),
        (DriverLibrary.libraryName, .driver),
        (NVRTCLibrary.libraryName, .nvrtc),
        ("NCCLCommFunctions", .nccl),   // loadOnce names a loader by its type
        ("libsomething.so.1", .system),
    ])
    func aMissingLibraryNamesItsLibraryAndEveryPlaceTried(file: String, library: BackendFailure.Library) throws {
        let attempts = ["/opt/x/\(file): cannot open shared object file: No such file or directory", "\(file): not found"]
        let cuda = CUDAError.libraryUnavailable(library: file, attempts: attempts)
        let error = throughGPU(cuda)
        let failure = try #require(lowerLayer(error))
        #expect(failure.library == library)
        #expect(failure.kind == .libraryUnavailable)
        #expect(failure.name == file)
        #expect(failure.code == nil)
        #expect(failure.attempts == attempts)
        #expect(error.description == cuda.description)
        #expect(error.description == "\(file) is not available\n  tried:\n    \(attempts[0])\n    \(attempts[1])")
    }

    @Test func aMissingLibraryWithNothingTriedReadsAsBefore() {
        let cuda = CUDAError.libraryUnavailable(library: NCCLLibrary.libraryName, attempts: [])
        #expect(EPError(cuda).description == "libnccl.so.2 is not available")
        #expect(EPError(cuda).description == cuda.description)
    }

    /// A real search: the loader's own error, converted.
    @Test func aLibraryThatCannotBeOpenedIsTypedAsItsLibrary() throws {
        let path = "/nonexistent/expert-parallel-test/libnccl.so.2"
        do {
            _ = try NCCLLibrary.load(candidates: [path])
            Issue.record("opened \(path)")
        } catch let cuda as CUDAError {
            let error = gpuError(cuda)
            let failure = try #require(lowerLayer(error))
            #expect(failure.library == .nccl && failure.kind == .libraryUnavailable && failure.name == NCCLLibrary.libraryName)
            #expect(failure.attempts.count == 1 && failure.attempts[0].hasPrefix(path + ": "))
            #expect(error.description == cuda.description)
        }
    }

    @Test func aMissingSymbolNamesTheLibraryAndTheSymbol() throws {
        // libc opened under NCCL's name: it opens, but has no NCCL symbol.
        let library = try DynamicLibrary.open(NCCLLibrary.libraryName, candidates: ["libc.so.6"])
        do {
            _ = try library.function("ncclGetVersion", as: (@convention(c) () -> Void).self)
            Issue.record("libc has ncclGetVersion")
        } catch let cuda as CUDAError {
            let error = throughGPU(cuda)
            let failure = try #require(lowerLayer(error))
            #expect(failure == .symbolMissing(.nccl, file: "libnccl.so.2", symbol: "ncclGetVersion"))
            #expect(failure.call == "ncclGetVersion" && failure.code == nil)
            #expect(error.description == cuda.description)
            #expect(error.description == "libnccl.so.2 has no symbol ncclGetVersion (is the library too old?)")
        }
    }

    @Test(arguments: [
        EPError.timeout(rank: 1, missing: [0, 2]),
        .invalidArgument(field: "device", value: "3", requirement: "must be in 0..<1 (devices found)"),
        .backend("rank 0: unknown device status 7"),
        .lowerLayer(.callFailed(.nccl, call: "ncclAllGather", code: 7, name: "ncclInProgress")),
    ])
    func anEPErrorPassesThroughUnchanged(error: EPError) {
        #expect(throughGPU(error) == error)
        #expect(gpuError(error) == error)
    }

    @Test func anErrorFromNeitherLayerKeepsItsText() {
        struct Odd: Error, CustomStringConvertible { var description: String { "something odd" } }
        #expect(throughGPU(Odd()) == .backend("something odd"))
    }

    @Test func aBodyThatSucceedsReturnsItsValue() throws {
        #expect(try gpu { 42 } == 42)
    }
}
