/// NVRTC, CUDA's runtime compiler (`libnvrtc.so.13`), opened at run time. It needs no GPU,
/// so CI compiles every kernel with the copy from the `nvidia-cuda-nvrtc` Python wheel.
///
/// Looked for, in order: `EP_NVRTC_PATH` (the library file, or a folder holding it); the
/// dynamic loader's search (`LD_LIBRARY_PATH`, ldconfig); `$CUDA_HOME/lib64` and
/// `/usr/local/cuda/lib64`; the wheel's folder in the Python site-packages folders.
public final class NVRTCLibrary: @unchecked Sendable {
    public static let libraryName = "libnvrtc.so.13"

    /// Where the library was opened from.
    public let location: String
    /// `nvrtcVersion`, e.g. (13, 0).
    public let version: (major: Int, minor: Int)
    let functions: NVRTCFunctions

    /// Resolves every entry point from `library` (tests: a table of mock functions) and asks
    /// for the version.
    package init(library: DynamicLibrary) throws {
        location = library.location
        functions = try NVRTCFunctions(library)
        var major: Int32 = 0
        var minor: Int32 = 0
        let result = functions.nvrtcVersion(&major, &minor)
        version = (Int(major), Int(minor))
        try check(result, "nvrtcVersion")
    }

    public static func load(candidates: [String]? = nil) throws -> NVRTCLibrary {
        try NVRTCLibrary(
            library: DynamicLibrary.open(libraryName, candidates: candidates ?? defaultCandidates(), prepare: preloadBuiltins))
    }

    /// NVRTC opens `libnvrtc-builtins.so.<major>.<minor>` by soname when it first compiles, which
    /// fails for folders the loader does not search (a Python wheel, EP_NVRTC_PATH). Loading it
    /// by path first, from the folder that holds the candidate, makes that lookup find it.
    static func preloadBuiltins(besides candidate: String) {
        guard let slash = candidate.lastIndex(of: "/") else { return }
        let folder = String(candidate[..<slash])
        for name in Environment.directoryEntries(folder)
        where name.hasPrefix("libnvrtc-builtins.so.") && !name.contains(".alt.") {
            DynamicLibrary.preload(LibrarySearch.join(folder, name))
        }
    }

    public static func defaultCandidates() -> [String] {
        var candidates = LibrarySearch.fromEnvironment("EP_NVRTC_PATH", fileName: libraryName)
        candidates.append(libraryName)
        for root in [Environment.value("CUDA_HOME"), Environment.value("CUDA_PATH"), "/usr/local/cuda"].compactMap({ $0 }) {
            let path = LibrarySearch.join(LibrarySearch.join(root, "lib64"), libraryName)
            if Environment.isFile(path) && !candidates.contains(path) { candidates.append(path) }
        }
        candidates += LibrarySearch.pythonWheelCandidates(
            fileName: libraryName, wheelFolders: ["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"])
        return candidates
    }

    private static let cached: Result<NVRTCLibrary, CUDAError> = loadOnce { try load() }

    /// The process-wide NVRTC, loaded on first use.
    public static func shared() throws -> NVRTCLibrary { try cached.get() }

    /// True when `shared()` finds NVRTC.
    public static var isAvailable: Bool { (try? shared()) != nil }

    /// Turns an `nvrtcResult` into a thrown `CUDAError.nvrtc` naming the call and the code.
    @inline(__always)
    public func check(_ result: Int32, _ call: StaticString, log: String = "") throws {
        if result != 0 { throw error(result, call, log: log) }
    }

    func error(_ result: Int32, _ call: StaticString, log: String = "") -> CUDAError {
        .nvrtc(call: "\(call)", code: result, name: errorName(result), log: log)
    }

    /// `nvrtcGetErrorString`, which gives the code's name, e.g. `NVRTC_ERROR_COMPILATION`.
    public func errorName(_ result: Int32) -> String {
        functions.nvrtcGetErrorString(result).map { String(cString: $0) } ?? "NVRTC_ERROR_UNKNOWN_CODE"
    }

    /// `nvrtcGetSupportedArchs`: the real architectures this NVRTC can target, e.g. [75, 80, …, 120].
    public func supportedArchitectures() throws -> [Int] {
        var count: Int32 = 0
        try check(functions.nvrtcGetNumSupportedArchs(&count), "nvrtcGetNumSupportedArchs")
        var archs = [Int32](repeating: 0, count: Int(count))
        try check(functions.nvrtcGetSupportedArchs(&archs), "nvrtcGetSupportedArchs")
        return archs.map(Int.init)
    }
}
