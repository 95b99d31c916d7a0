import ExpertParallel
import Testing

/// `BackendFailure`, the core's typed description of a failure below the library, and the
/// `EPError.lowerLayer` case that carries it: the same text as the CUDA layer's errors.
struct BackendFailureTests {
    @Test func aCallFailureReadsCallNameAndCode() {
        let failure = BackendFailure.callFailed(.driver, call: "cuModuleLoadData", code: 218, name: "CUDA_ERROR_INVALID_PTX")
        #expect(failure.description == "cuModuleLoadData failed: CUDA_ERROR_INVALID_PTX (218)")
        #expect(EPError.lowerLayer(failure).description == failure.description)
        #expect(failure.kind == .callFailed && failure.detail.isEmpty && failure.attempts.isEmpty)
    }

    @Test func aCallFailureWithoutACodeLeavesItOut() {
        let failure = BackendFailure.callFailed(.nccl, call: "ncclAllGather", code: nil, name: "no answer within 2 s")
        #expect(failure.description == "ncclAllGather failed: no answer within 2 s")
    }

    @Test func aCompilerLogFollowsOnItsOwnLinesTrimmed() {
        let failure = BackendFailure.callFailed(.nvrtc, call: "nvrtcCompileProgram", code: 6, name: "NVRTC_ERROR_COMPILATION",
                                                detail: "a.cu(1): error\n \n\0")
        #expect(failure.description == "nvrtcCompileProgram failed: NVRTC_ERROR_COMPILATION (6)\na.cu(1): error")
        let blank = BackendFailure.callFailed(.nvrtc, call: "nvrtcCompileProgram", code: 6, name: "NVRTC_ERROR_COMPILATION", detail: " \n")
        #expect(blank.description == "nvrtcCompileProgram failed: NVRTC_ERROR_COMPILATION (6)")
    }

    @Test func aMissingLibraryListsEveryPlaceTried() {
        let failure = BackendFailure.libraryUnavailable(.nccl, file: "libnccl.so.2", attempts: ["a: not found", "b: not found"])
        #expect(failure.attempts == ["a: not found", "b: not found"])
        #expect(failure.code == nil && failure.call == "dlopen" && failure.name == "libnccl.so.2")
        #expect(failure.description == "libnccl.so.2 is not available\n  tried:\n    a: not found\n    b: not found")
        let none = BackendFailure.libraryUnavailable(.driver, file: "libcuda.so.1", attempts: [])
        #expect(none.attempts.isEmpty && none.description == "libcuda.so.1 is not available")
    }

    @Test func aMissingSymbolNamesTheLibrary() {
        let failure = BackendFailure.symbolMissing(.nccl, file: "libnccl.so.2", symbol: "ncclCommWindowRegister")
        #expect(failure.description == "libnccl.so.2 has no symbol ncclCommWindowRegister (is the library too old?)")
    }

    @Test func lowerLayerErrorsCompareByEveryField() {
        let a = EPError.lowerLayer(.callFailed(.nccl, call: "ncclSend", code: 2, name: "ncclSystemError"))
        #expect(a == .lowerLayer(.callFailed(.nccl, call: "ncclSend", code: 2, name: "ncclSystemError")))
        #expect(a != .lowerLayer(.callFailed(.driver, call: "ncclSend", code: 2, name: "ncclSystemError")))
        #expect(a != .backend(a.description))
    }
}
