import ExpertParallel
import ExpertParallelCUDA

// The CUDA layer's errors as the core describes them. The core cannot import the CUDA layer, so
// `EPError.lowerLayer` carries a `BackendFailure`: the same fields, the same text, typed all the
// way to the C status codes (NCCL → epNcclError, the driver and NVRTC → epCudaError).

extension BackendFailure {
    /// `error` described for the core: its library, call, code and code name, and its text.
    public init(_ error: CUDAError) {
        switch error {
        case let .driver(call, code, name):
            self = .callFailed(.driver, call: call, code: code, name: name)
        case let .nvrtc(call, code, name, log):
            self = .callFailed(.nvrtc, call: call, code: code, name: name, detail: log)
        case let .nccl(call, code, name):
            self = .callFailed(.nccl, call: call, code: code, name: name)
        case let .libraryUnavailable(library, attempts):
            self = .libraryUnavailable(Library(file: library), file: library, attempts: attempts)
        case let .symbolMissing(library, symbol):
            self = .symbolMissing(Library(file: library), file: library, symbol: symbol)
        }
    }
}

extension BackendFailure.Library {
    /// The library a `CUDAError` names: by its file name (`libnccl.so.2`), or by the Swift type
    /// whose loader failed (`NCCLCommFunctions`, when the loader threw something other than a
    /// `CUDAError`); `.system` for any other library.
    init(file name: String) {
        switch name {
        case DriverLibrary.libraryName: self = .driver
        case NVRTCLibrary.libraryName: self = .nvrtc
        case NCCLLibrary.libraryName: self = .nccl
        case _ where name.hasPrefix("Driver"): self = .driver
        case _ where name.hasPrefix("NVRTC"): self = .nvrtc
        case _ where name.hasPrefix("NCCL"): self = .nccl
        default: self = .system
        }
    }
}

extension EPError {
    /// `error` as `EPError.lowerLayer`, reading exactly as `error` does.
    public init(_ error: CUDAError) {
        self = .lowerLayer(BackendFailure(error))
    }

    /// Any error thrown below the core as an `EPError`: an `EPError` unchanged, a `CUDAError`
    /// as `.lowerLayer`, anything else as `.backend` with its text.
    public init(lowerLayer error: any Error) {
        switch error {
        case let error as EPError: self = error
        case let error as CUDAError: self.init(error)
        default: self = .backend("\(error)")
        }
    }
}
