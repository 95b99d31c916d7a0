import ExpertParallelCUDA

/// Names one compiled kernel image: a 128-bit FNV-1a hash of everything that changes the
/// compiler's output (source text, options in order, arch, output format, NVRTC version).
public struct KernelCacheKey: Hashable, Sendable, CustomStringConvertible {
    public let value: UInt128

    public init(source: String, options: [String], arch: GPUArch, format: KernelImageFormat, compilerVersion: String) {
        var hash = FNV1a128()
        hash.add("expert-parallel kernel cache v1")
        hash.add(source)
        hash.add(options.count)
        for option in options { hash.add(option) }
        hash.add(arch.rawValue)
        hash.add(format.rawValue)
        hash.add(compilerVersion)
        value = hash.value
    }

    /// 32 lowercase hex digits.
    public var description: String {
        let hex = String(value, radix: 16)
        return String(repeating: "0", count: 32 - hex.count) + hex
    }
}

/// FNV-1a over bytes, 128-bit variant. Each field is followed by a 0xFF byte (never in
/// UTF-8), so ("ab", "c") and ("a", "bc") hash differently.
struct FNV1a128 {
    private static let prime: UInt128 = (1 << 88) + 0x13B
    private(set) var value: UInt128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d

    mutating func add<Bytes: Sequence<UInt8>>(bytes: Bytes) {
        for byte in bytes {
            value ^= UInt128(byte)
            value &*= Self.prime
        }
    }

    mutating func add(_ text: String) {
        add(bytes: text.utf8)
        add(bytes: CollectionOfOne(UInt8(0xFF)))
    }

    mutating func add(_ number: Int) {
        add(String(number))
    }
}
