/// A device's compute capability, e.g. 9.0 for Hopper.
public struct ComputeCapability: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var major: Int
    public var minor: Int

    public init(major: Int, minor: Int) {
        self.major = major
        self.minor = minor
    }

    /// The architecture to compile for: the arch-specific variant (`sm_90a`, `sm_100a`) from
    /// Hopper on, so kernels may use its features; plain `sm_XY` before.
    public var nativeArch: GPUArch {
        GPUArch(rawValue: "sm_\(major)\(minor)" + (major >= 9 ? "a" : ""))
    }

    public var description: String { "\(major).\(minor)" }

    public static func < (lhs: Self, rhs: Self) -> Bool { (lhs.major, lhs.minor) < (rhs.major, rhs.minor) }
}

/// An NVRTC target architecture: a real one (`sm_90a`) compiles to CUBIN, a virtual one
/// (`compute_90a`) to PTX that the driver finishes at load time.
public struct GPUArch: RawRepresentable, Hashable, Sendable, CustomStringConvertible, ExpressibleByStringLiteral {
    public var rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public init(stringLiteral value: String) { self.init(rawValue: value) }

    /// Hopper, with its arch-specific instructions (wgmma, setmaxnreg, …).
    public static let hopper: GPUArch = "sm_90a"

    public var isReal: Bool { rawValue.hasPrefix("sm_") }

    /// What NVRTC produces for this arch.
    public var imageFormat: KernelImageFormat { isReal ? .cubin : .ptx }

    public var description: String { rawValue }
}

/// The form of a compiled kernel image that `cuModuleLoadData` accepts.
public enum KernelImageFormat: String, Hashable, Sendable {
    /// An ELF for one real architecture.
    case cubin
    /// NUL-terminated PTX text, JIT-compiled by the driver when loaded.
    case ptx
}
