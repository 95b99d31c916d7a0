#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ExpertParallelCUDA

/// Compiled kernel images on disk, one file per `KernelCacheKey`, under `$EP_CACHE_DIR` or
/// `~/.cache/expert-parallel/`. Files are written to a temporary name and renamed into
/// place, so processes compiling the same kernel at once never see a partial file.
/// A cache that cannot be written is not an error: the kernel is just compiled again next time.
public struct KernelCache: Sendable {
    public let directory: String

    public init(directory: String) {
        self.directory = directory
    }

    /// `$EP_CACHE_DIR`, else `~/.cache/expert-parallel`; nil when neither can be determined.
    public static var defaultDirectory: String? {
        if let directory = Environment.value("EP_CACHE_DIR") { return directory }
        guard let home = Environment.homeDirectory else { return nil }
        return home + "/.cache/expert-parallel"
    }

    public static var `default`: KernelCache? { defaultDirectory.map(KernelCache.init(directory:)) }

    /// The file for an image: the source name and arch make listings readable; the key decides.
    public func path(for key: KernelCacheKey, name: String, arch: GPUArch, format: KernelImageFormat) -> String {
        "\(directory)/\(name)-\(arch.rawValue)-\(key).\(format.rawValue)"
    }

    /// The stored image, or nil when absent or not a plausible image of that format.
    public func load(_ path: String, format: KernelImageFormat) -> [UInt8]? {
        guard let bytes = readFile(path), Self.isPlausible(bytes, format) else { return nil }
        return bytes
    }

    /// Stores an image; returns false when the cache cannot be written.
    @discardableResult
    public func store(_ image: [UInt8], at path: String) -> Bool {
        guard makeDirectories(directory) else { return false }
        let temporary = "\(path).\(getpid()).\(UInt64.random(in: 0...UInt64.max)).tmp"
        guard writeFile(temporary, image) else {
            unlink(temporary)
            return false
        }
        guard rename(temporary, path) == 0 else {
            unlink(temporary)
            return false
        }
        return true
    }

    static func isPlausible(_ image: [UInt8], _ format: KernelImageFormat) -> Bool {
        switch format {
        case .cubin: image.starts(with: [0x7F, 0x45, 0x4C, 0x46])  // ELF
        case .ptx: image.count > 1 && image.last == 0
        }
    }
}

private func readFile(_ path: String) -> [UInt8]? {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else { return nil }
    defer { close(descriptor) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
        if count > 0 {
            bytes += chunk[0..<count]
        } else if count == 0 {
            return bytes
        } else if errno != EINTR {
            return nil
        }
    }
}

private func writeFile(_ path: String, _ bytes: [UInt8]) -> Bool {
    let descriptor = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
    guard descriptor >= 0 else { return false }
    defer { close(descriptor) }
    var offset = 0
    while offset < bytes.count {
        let count = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress! + offset, $0.count - offset) }
        if count > 0 {
            offset += count
        } else if count < 0 && errno != EINTR {
            return false
        }
    }
    return true
}

/// `mkdir -p`; true when the directory exists afterwards.
private func makeDirectories(_ path: String) -> Bool {
    if Environment.isDirectory(path) { return true }
    if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
        guard makeDirectories(String(path[..<slash])) else { return false }
    }
    return mkdir(path, 0o755) == 0 || Environment.isDirectory(path)
}
