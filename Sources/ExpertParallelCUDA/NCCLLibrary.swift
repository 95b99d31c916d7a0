/// NCCL (`libnccl.so.2`), opened at run time: the version query, and the communicator calls a
/// rank needs to join a group and exchange its buffers (NCCLCommunicator.swift).
public final class NCCLLibrary: @unchecked Sendable {
    public static let libraryName = "libnccl.so.2"

    struct NCCLFunctions {
        let ncclGetVersion: @convention(c) (UnsafeMutablePointer<Int32>?) -> Int32
        let ncclGetErrorString: @convention(c) (Int32) -> UnsafePointer<CChar>?

        init(_ library: DynamicLibrary) throws {
            ncclGetVersion = try library.function("ncclGetVersion")
            ncclGetErrorString = try library.function("ncclGetErrorString")
        }
    }

    public let location: String
    let functions: NCCLFunctions
    /// Missing symbols here fail the calls that need them, not the version query.
    private let commFunctions: Result<NCCLCommFunctions, CUDAError>
    private let memoryFunctions: Result<NCCLMemoryFunctions, CUDAError>
    /// NCCL 2.29's host peer-pointer queries on windows; each nil where the library lacks it.
    let peerPointerFunctions: NCCLPeerPointerFunctions

    /// Resolves the entry points from `library` (tests: a table of mock functions).
    package init(library: DynamicLibrary) throws {
        location = library.location
        functions = try NCCLFunctions(library)
        commFunctions = loadOnce { try NCCLCommFunctions(library) }
        memoryFunctions = loadOnce { try NCCLMemoryFunctions(library) }
        peerPointerFunctions = NCCLPeerPointerFunctions(library)
    }

    func comm() throws -> NCCLCommFunctions { try commFunctions.get() }
    func memory() throws -> NCCLMemoryFunctions { try memoryFunctions.get() }

    /// `EP_NCCL_PATH` (file or folder), the loader's search, then the `nvidia-nccl-cu13`/`-cu12` wheels.
    public static func load(candidates: [String]? = nil) throws -> NCCLLibrary {
        let defaults = LibrarySearch.fromEnvironment("EP_NCCL_PATH", fileName: libraryName) + [libraryName]
            + LibrarySearch.pythonWheelCandidates(fileName: libraryName, wheelFolders: ["nvidia/nccl/lib", "nvidia/cu13/lib"])
        return try NCCLLibrary(library: DynamicLibrary.open(libraryName, candidates: candidates ?? defaults))
    }

    private static let cached: Result<NCCLLibrary, CUDAError> = loadOnce { try load() }

    public static func shared() throws -> NCCLLibrary { try cached.get() }

    /// Turns an `ncclResult_t` into a thrown `CUDAError.nccl` naming the call and the code.
    @inline(__always)
    public func check(_ result: Int32, _ call: StaticString) throws {
        if result != 0 { throw CUDAError.nccl(call: "\(call)", code: result, name: errorName(result)) }
    }

    /// The `ncclResult_t` enumerator's name (nccl.h), with `ncclGetErrorString`'s sentence.
    public func errorName(_ result: Int32) -> String {
        let names = [
            "ncclSuccess", "ncclUnhandledCudaError", "ncclSystemError", "ncclInternalError",
            "ncclInvalidArgument", "ncclInvalidUsage", "ncclRemoteError", "ncclInProgress",
        ]
        let name = names.indices.contains(Int(result)) ? names[Int(result)] : "ncclResult"
        let sentence = functions.ncclGetErrorString(result).map { String(cString: $0) } ?? ""
        return sentence.isEmpty ? name : "\(name) \"\(sentence)\""
    }

    /// `ncclGetVersion`, decoded from `major × 10000 + minor × 100 + patch`, e.g. (2, 28, 9).
    public func version() throws -> (major: Int, minor: Int, patch: Int) {
        var code: Int32 = 0
        try check(functions.ncclGetVersion(&code), "ncclGetVersion")
        let value = Int(code)
        return value >= 10000 ? (value / 10000, value / 100 % 100, value % 100) : (value / 1000, value / 100 % 10, value % 100)
    }
}
