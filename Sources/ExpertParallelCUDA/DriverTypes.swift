/// Thin typed wrappers over the driver's C handles: the Swift type says what the value is,
/// and costs nothing. Handles are plain values; whoever created one destroys it.

/// A device address (`CUdeviceptr`).
public struct DevicePointer: RawRepresentable, Hashable, Sendable, BitwiseCopyable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let null = DevicePointer(rawValue: 0)

    /// The address `byteOffset` bytes further on.
    public func advanced(by byteOffset: Int) -> DevicePointer {
        DevicePointer(rawValue: UInt64(bitPattern: Int64(bitPattern: rawValue) &+ Int64(byteOffset)))
    }

    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// A device ordinal as the driver knows it (`CUdevice`).
public struct CUDADevice: RawRepresentable, Hashable, Sendable {
    public var rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
}

/// A context (`CUcontext`); this package uses each device's primary context.
public struct CUDAContext: RawRepresentable, Hashable, @unchecked Sendable {
    public var rawValue: OpaquePointer
    public init(rawValue: OpaquePointer) { self.rawValue = rawValue }
}

/// A stream (`CUstream`); `.legacyDefault` is the NULL stream.
public struct CUDAStream: RawRepresentable, Hashable, @unchecked Sendable {
    public var rawValue: OpaquePointer?
    public init(rawValue: OpaquePointer?) { self.rawValue = rawValue }

    public static let legacyDefault = CUDAStream(rawValue: nil)
}

/// An event (`CUevent`).
public struct CUDAEvent: RawRepresentable, Hashable, @unchecked Sendable {
    public var rawValue: OpaquePointer
    public init(rawValue: OpaquePointer) { self.rawValue = rawValue }
}

/// A loaded module (`CUmodule`).
public struct CUDAModule: RawRepresentable, Hashable, @unchecked Sendable {
    public var rawValue: OpaquePointer
    public init(rawValue: OpaquePointer) { self.rawValue = rawValue }
}

/// A kernel inside a loaded module (`CUfunction`).
public struct CUDAFunction: RawRepresentable, Hashable, @unchecked Sendable {
    public var rawValue: OpaquePointer
    public init(rawValue: OpaquePointer) { self.rawValue = rawValue }
}

/// A captured graph (`CUgraph`).
public struct CUDAGraph: RawRepresentable, Hashable, @unchecked Sendable {
    public var rawValue: OpaquePointer
    public init(rawValue: OpaquePointer) { self.rawValue = rawValue }
}

/// An instantiated, launchable graph (`CUgraphExec`).
public struct CUDAGraphExec: RawRepresentable, Hashable, @unchecked Sendable {
    public var rawValue: OpaquePointer
    public init(rawValue: OpaquePointer) { self.rawValue = rawValue }
}

/// Grid or block extent of a launch.
public struct LaunchDimensions: Hashable, Sendable, ExpressibleByIntegerLiteral {
    public var x: UInt32
    public var y: UInt32
    public var z: UInt32

    public init(x: UInt32, y: UInt32 = 1, z: UInt32 = 1) {
        self.x = x
        self.y = y
        self.z = z
    }

    public init(integerLiteral value: UInt32) { self.init(x: value) }
}
