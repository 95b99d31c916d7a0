/// Every way the CUDA layer can fail, each naming what failed.
///
/// A failing call reads like `cuModuleLoadData failed: CUDA_ERROR_INVALID_PTX (218)`; a missing
/// library lists every place that was tried, so "no GPU here" is an answer, never a crash.
public enum CUDAError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A shared library could not be opened from any candidate location.
    case libraryUnavailable(library: String, attempts: [String])
    /// The library opened but lacks a symbol this package needs (too old a version?).
    case symbolMissing(library: String, symbol: String)
    /// A driver API call (`cu*`) returned a code other than `CUDA_SUCCESS`.
    case driver(call: String, code: Int32, name: String)
    /// An NVRTC call failed; `log` holds the program log when the call was a compilation.
    case nvrtc(call: String, code: Int32, name: String, log: String)
    /// An NCCL call returned a code other than `ncclSuccess`.
    case nccl(call: String, code: Int32, name: String)

    public var description: String {
        switch self {
        case let .libraryUnavailable(library, attempts):
            let tried = attempts.isEmpty ? "" : "\n  tried:\n" + attempts.map { "    \($0)" }.joined(separator: "\n")
            return "\(library) is not available\(tried)"
        case let .symbolMissing(library, symbol):
            return "\(library) has no symbol \(symbol) (is the library too old?)"
        case let .driver(call, code, name), let .nccl(call, code, name):
            return "\(call) failed: \(name) (\(code))"
        case let .nvrtc(call, code, name, log):
            let trimmed = log.trimmingTrailingWhitespace
            return "\(call) failed: \(name) (\(code))" + (trimmed.isEmpty ? "" : "\n\(trimmed)")
        }
    }

    /// The numeric code for call failures; nil for library and symbol errors.
    public var code: Int32? {
        switch self {
        case .libraryUnavailable, .symbolMissing: nil
        case let .driver(_, code, _), let .nvrtc(_, code, _, _), let .nccl(_, code, _): code
        }
    }

    /// True when the driver answered that this machine has no usable GPU
    /// (`CUDA_ERROR_NO_DEVICE`), or when the driver library itself is missing.
    public var meansNoDevice: Bool {
        switch self {
        case .libraryUnavailable(let library, _): library == DriverLibrary.libraryName
        case .driver(_, let code, _): code == DriverResult.noDevice
        default: false
        }
    }
}

extension String {
    var trimmingTrailingWhitespace: String {
        var text = Substring(self)
        while let last = text.last, last.isWhitespace || last == "\0" { text.removeLast() }
        return String(text)
    }
}
