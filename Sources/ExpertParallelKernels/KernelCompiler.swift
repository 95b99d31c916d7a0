import ExpertParallelCUDA
import Synchronization

/// A kernel image ready for `DriverLibrary.loadModule(image:)`.
public struct CompiledKernel: Sendable {
    public let sourceName: String
    public let arch: GPUArch
    public let format: KernelImageFormat
    /// CUBIN bytes, or NUL-terminated PTX.
    public let image: [UInt8]
    public let key: KernelCacheKey
    /// NVRTC's warnings; empty for images that came from the cache.
    public let log: String
    /// Where the image came from, for logs and tests.
    public let origin: Origin

    public enum Origin: Sendable, Equatable {
        case compiled
        case diskCache
        case memoryCache
    }
}

/// Compiles kernel sources with NVRTC for one architecture, specialised by `-D` defines,
/// and caches the images in memory and on disk (`KernelCache`).
///
///     let compiler = try KernelCompiler.shared()
///     let kernel = try compiler.compile(.copy, arch: .hopper, defines: ["EP_COPY_UNROLL": "8"])
///
/// Thread-safe; two threads asking for the same kernel at once may both compile it.
public final class KernelCompiler: Sendable {
    public let nvrtc: NVRTCLibrary
    public let cache: KernelCache?
    private let compiled = Mutex<[KernelCacheKey: CompiledKernel]>([:])

    /// Options every compilation gets. No fast-math: combine results must be bit-identical to the CPU.
    public static let baseOptions = ["-std=c++17", "-default-device", "-lineinfo"]

    /// `cache: nil` compiles every time (used to prove that sources compile).
    public init(nvrtc: NVRTCLibrary, cache: KernelCache? = .default) {
        self.nvrtc = nvrtc
        self.cache = cache
    }

    private static let cached: Result<KernelCompiler, CUDAError> = {
        do {
            return .success(KernelCompiler(nvrtc: try NVRTCLibrary.shared()))
        } catch {
            return .failure(error as? CUDAError ?? .libraryUnavailable(library: NVRTCLibrary.libraryName, attempts: ["\(error)"]))
        }
    }()

    /// The process-wide compiler over `NVRTCLibrary.shared()` and the default disk cache.
    public static func shared() throws -> KernelCompiler { try cached.get() }

    /// The NVRTC options for a compilation, in the order they are passed (and hashed):
    /// the arch, the base options, then `-DNAME=VALUE` sorted by name, then `extraOptions`.
    public static func options(arch: GPUArch, defines: [String: String], extraOptions: [String]) -> [String] {
        ["--gpu-architecture=\(arch.rawValue)"] + baseOptions
            + defines.sorted { $0.key < $1.key }.map { "-D\($0.key)=\($0.value)" }
            + extraOptions
    }

    /// The cache key this compiler would use.
    public func key(for source: KernelSource, arch: GPUArch, defines: [String: String] = [:], extraOptions: [String] = []) -> KernelCacheKey {
        KernelCacheKey(
            source: source.text, options: Self.options(arch: arch, defines: defines, extraOptions: extraOptions),
            arch: arch, format: arch.imageFormat, compilerVersion: compilerVersion)
    }

    /// `"nvrtc 13.0"`: part of every cache key, so a new NVRTC recompiles.
    public var compilerVersion: String { "nvrtc \(nvrtc.version.major).\(nvrtc.version.minor)" }

    /// The image for `source` on `arch`: from memory, the disk cache, or NVRTC, in that order.
    /// Throws `CUDAError.nvrtc` with the program log when the source does not compile.
    public func compile(
        _ source: KernelSource, arch: GPUArch, defines: [String: String] = [:], extraOptions: [String] = []
    ) throws -> CompiledKernel {
        let options = Self.options(arch: arch, defines: defines, extraOptions: extraOptions)
        let format = arch.imageFormat
        let key = KernelCacheKey(source: source.text, options: options, arch: arch, format: format, compilerVersion: compilerVersion)
        if let kernel = compiled.withLock({ $0[key] }) {
            return CompiledKernel(
                sourceName: kernel.sourceName, arch: arch, format: format, image: kernel.image, key: key, log: kernel.log,
                origin: .memoryCache)
        }
        let path = cache?.path(for: key, name: source.name, arch: arch, format: format)
        let kernel: CompiledKernel
        if let cache, let path, let image = cache.load(path, format: format) {
            kernel = CompiledKernel(sourceName: source.name, arch: arch, format: format, image: image, key: key, log: "", origin: .diskCache)
        } else {
            let output = try nvrtc.compile(source: source.text, name: "\(source.name).cu", options: options, format: format)
            if let cache, let path { cache.store(output.image, at: path) }
            kernel = CompiledKernel(
                sourceName: source.name, arch: arch, format: format, image: output.image, key: key, log: output.log, origin: .compiled)
        }
        compiled.withLock { $0[key] = kernel }
        return kernel
    }
}
