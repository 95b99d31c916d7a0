import ExpertParallelCUDA
import ExpertParallelKernels
import Foundation
import Testing

@Suite("Kernel cache")
struct KernelCacheTests {
    static func key(
        source: String = "k", options: [String] = ["-DA=1"], arch: GPUArch = .hopper,
        format: KernelImageFormat = .cubin, compilerVersion: String = "nvrtc 13.0"
    ) -> KernelCacheKey {
        KernelCacheKey(source: source, options: options, arch: arch, format: format, compilerVersion: compilerVersion)
    }

    @Test func sameInputsGiveTheSameKey() {
        #expect(Self.key() == Self.key())
        #expect(Self.key().description.count == 32)
    }

    @Test func keyChangesWithEveryInput() {
        let base = Self.key()
        #expect(Self.key(source: "k2") != base)
        #expect(Self.key(options: ["-DA=2"]) != base)
        #expect(Self.key(options: ["-DA=1", "-lineinfo"]) != base)
        #expect(Self.key(arch: "sm_100a") != base)
        #expect(Self.key(format: .ptx) != base)
        #expect(Self.key(compilerVersion: "nvrtc 13.1") != base)
    }

    @Test func fieldBoundariesCount() {
        #expect(Self.key(options: ["ab", "c"]) != Self.key(options: ["a", "bc"]))
        #expect(Self.key(source: "k-DA=1", options: []) != Self.key(source: "k", options: ["-DA=1"]))
    }

    @Test func definesAreOrderedByNameInTheOptions() {
        let options = KernelCompiler.options(arch: .hopper, defines: ["B": "2", "A": "1"], extraOptions: ["-G"])
        #expect(options.first == "--gpu-architecture=sm_90a")
        #expect(Array(options.suffix(3)) == ["-DA=1", "-DB=2", "-G"])
    }

    @Test func storedImageIsLoadedBackAndFoldersAreCreated() throws {
        let temporary = try TemporaryDirectory()
        defer { temporary.remove() }
        let cache = KernelCache(directory: temporary.path + "/nested/cache")
        let path = cache.path(for: Self.key(), name: "ep_copy", arch: .hopper, format: .cubin)
        let image: [UInt8] = [0x7F, 0x45, 0x4C, 0x46, 1, 2, 3]
        #expect(cache.load(path, format: .cubin) == nil)
        #expect(cache.store(image, at: path))
        #expect(cache.load(path, format: .cubin) == image)
    }

    @Test func implausibleImagesAreIgnored() throws {
        let temporary = try TemporaryDirectory()
        defer { temporary.remove() }
        let cache = KernelCache(directory: temporary.path)
        let cubinPath = cache.path(for: Self.key(), name: "k", arch: .hopper, format: .cubin)
        let ptxPath = cache.path(for: Self.key(format: .ptx), name: "k", arch: "compute_90a", format: .ptx)
        cache.store([1, 2, 3], at: cubinPath)
        cache.store(Array(".version 9.0".utf8), at: ptxPath)
        #expect(cache.load(cubinPath, format: .cubin) == nil)
        #expect(cache.load(ptxPath, format: .ptx) == nil)
    }

    @Test func concurrentWritersLeaveOneCompleteFile() async throws {
        let temporary = try TemporaryDirectory()
        defer { temporary.remove() }
        let cache = KernelCache(directory: temporary.path)
        let path = cache.path(for: Self.key(), name: "k", arch: .hopper, format: .cubin)
        let image = [0x7F, 0x45, 0x4C, 0x46] + [UInt8](repeating: 0x5A, count: 1 << 20)
        let stored = await withTaskGroup(of: Bool.self) { group in
            for _ in 0..<8 { group.addTask { cache.store(image, at: path) } }
            return await group.reduce(true) { $0 && $1 }
        }
        #expect(stored)
        #expect(cache.load(path, format: .cubin) == image)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: temporary.path)
        #expect(leftovers == [(path as NSString).lastPathComponent], "no temporary files remain")
    }

    @Test(.enabled(if: TestEnvironment.runsNVRTCTests, "needs NVRTC"))
    func compiledImageIsReusedFromDiskAndMemory() throws {
        let temporary = try TemporaryDirectory()
        defer { temporary.remove() }
        let nvrtc = try NVRTCLibrary.shared()
        let first = try KernelCompiler(nvrtc: nvrtc, cache: KernelCache(directory: temporary.path)).compile(.copy, arch: .hopper)
        let secondCompiler = KernelCompiler(nvrtc: nvrtc, cache: KernelCache(directory: temporary.path))
        let fromDisk = try secondCompiler.compile(.copy, arch: .hopper)
        let fromMemory = try secondCompiler.compile(.copy, arch: .hopper)
        let otherArch = try secondCompiler.compile(.copy, arch: "sm_80")
        #expect(first.origin == .compiled)
        #expect(fromDisk.origin == .diskCache)
        #expect(fromMemory.origin == .memoryCache)
        #expect(fromDisk.image == first.image && fromMemory.image == first.image)
        #expect(otherArch.origin == .compiled && otherArch.key != first.key)
    }
}

