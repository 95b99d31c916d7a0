/// The CUDA driver API (`libcuda.so.1`), opened at run time so that code using it builds and
/// runs on machines without CUDA: there, `DriverLibrary.shared()` throws
/// `CUDAError.libraryUnavailable` instead of the process failing to start.
///
/// Methods are thin: one driver call each, its result checked by `check(_:_:)`.
/// The driver binds contexts per thread: call `setCurrent(_:)` on each thread that makes calls.
public final class DriverLibrary: @unchecked Sendable {
    public static let libraryName = "libcuda.so.1"

    /// Where the library was opened from.
    public let location: String
    let functions: DriverFunctions
    /// IPC entry points (NCCL ranks); a driver without them fails only the IPC calls.
    private let ipcFunctions: Result<DriverIPCFunctions, CUDAError>
    /// Virtual-memory sharing (NCCL ranks with `ncclMemAlloc` buffers); likewise optional.
    private let vmmFunctions: Result<DriverVMMFunctions, CUDAError>

    /// Resolves every entry point from `library`: the opened driver, or (tests) a table of mock
    /// functions (`DynamicLibrary(name:location:symbols:)`).
    package init(library: DynamicLibrary) throws {
        location = library.location
        functions = try DriverFunctions(library)
        ipcFunctions = loadOnce { try DriverIPCFunctions(library) }
        vmmFunctions = loadOnce { try DriverVMMFunctions(library) }
    }

    func ipc() throws -> DriverIPCFunctions { try ipcFunctions.get() }
    func vmm() throws -> DriverVMMFunctions { try vmmFunctions.get() }

    /// Opens the driver from the first of `candidates` (sonames or paths) and resolves every
    /// entry point. Most code wants `shared()`.
    public static func load(candidates: [String] = defaultCandidates) throws -> DriverLibrary {
        try DriverLibrary(library: DynamicLibrary.open(libraryName, candidates: candidates))
    }

    /// `EP_CUDA_DRIVER_PATH` (a file, or a folder holding libcuda.so.1) first, then the loader's search.
    public static var defaultCandidates: [String] {
        LibrarySearch.fromEnvironment("EP_CUDA_DRIVER_PATH", fileName: libraryName) + [libraryName, "libcuda.so"]
    }

    private static let cached: Result<DriverLibrary, CUDAError> = loadOnce { try load() }

    /// The process-wide driver, loaded on first use. Does not call `cuInit`: see `initialize()`.
    public static func shared() throws -> DriverLibrary { try cached.get() }

    /// Turns a `CUresult` into a thrown `CUDAError.driver` naming the call and the code.
    @inline(__always)
    public func check(_ result: Int32, _ call: StaticString) throws {
        if result != DriverResult.success { throw error(result, call) }
    }

    func error(_ result: Int32, _ call: StaticString) -> CUDAError {
        .driver(call: "\(call)", code: result, name: errorName(result))
    }

    /// `cuGetErrorName`: e.g. `CUDA_ERROR_INVALID_PTX`; a placeholder for codes the driver does not know.
    public func errorName(_ result: Int32) -> String {
        var name: UnsafePointer<CChar>?
        guard functions.cuGetErrorName(result, &name) == DriverResult.success, let name else {
            return "CUDA_ERROR_UNKNOWN_CODE"
        }
        return String(cString: name)
    }

    /// `cuGetErrorString`: the driver's sentence for a code.
    public func errorDescription(_ result: Int32) -> String {
        var text: UnsafePointer<CChar>?
        guard functions.cuGetErrorString(result, &text) == DriverResult.success, let text else { return "" }
        return String(cString: text)
    }

    /// `cuInit(0)`; safe to call more than once. Throws `CUDA_ERROR_NO_DEVICE` where the driver
    /// is installed but no GPU is visible (`CUDAError.meansNoDevice`).
    public func initialize() throws {
        try check(functions.cuInit(0), "cuInit")
    }

    /// `cuDriverGetVersion`: 1000 × major + 10 × minor, e.g. 13000 for CUDA 13.0.
    public func driverVersion() throws -> Int32 {
        var version: Int32 = 0
        try check(functions.cuDriverGetVersion(&version), "cuDriverGetVersion")
        return version
    }
}
