/// `CUresult` codes the package reacts to (the rest are reported by name).
public enum DriverResult {
    public static let success: Int32 = 0
    public static let notInitialized: Int32 = 3
    public static let noDevice: Int32 = 100
    public static let notReady: Int32 = 600
}

/// `CUdevice_attribute` values (cuda.h).
public struct DeviceAttribute: RawRepresentable, Hashable, Sendable {
    public var rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public static let maxThreadsPerBlock = DeviceAttribute(rawValue: 1)
    public static let warpSize = DeviceAttribute(rawValue: 10)
    /// Kilohertz.
    public static let clockRate = DeviceAttribute(rawValue: 13)
    public static let multiprocessorCount = DeviceAttribute(rawValue: 16)
    public static let pciBusID = DeviceAttribute(rawValue: 33)
    /// Kilohertz.
    public static let memoryClockRate = DeviceAttribute(rawValue: 36)
    /// Bits.
    public static let globalMemoryBusWidth = DeviceAttribute(rawValue: 37)
    public static let l2CacheSize = DeviceAttribute(rawValue: 38)
    public static let maxThreadsPerMultiprocessor = DeviceAttribute(rawValue: 39)
    public static let unifiedAddressing = DeviceAttribute(rawValue: 41)
    public static let computeCapabilityMajor = DeviceAttribute(rawValue: 75)
    public static let computeCapabilityMinor = DeviceAttribute(rawValue: 76)
    public static let maxSharedMemoryPerMultiprocessor = DeviceAttribute(rawValue: 81)
    public static let cooperativeLaunch = DeviceAttribute(rawValue: 95)
    public static let maxSharedMemoryPerBlockOptin = DeviceAttribute(rawValue: 97)
    public static let maxBlocksPerMultiprocessor = DeviceAttribute(rawValue: 106)
}

/// `CUfunction_attribute` values (cuda.h).
public struct FunctionAttribute: RawRepresentable, Hashable, Sendable {
    public var rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public static let maxThreadsPerBlock = FunctionAttribute(rawValue: 0)
    public static let sharedSizeBytes = FunctionAttribute(rawValue: 1)
    public static let localSizeBytes = FunctionAttribute(rawValue: 3)
    public static let numRegisters = FunctionAttribute(rawValue: 4)
    public static let maxDynamicSharedSizeBytes = FunctionAttribute(rawValue: 8)
    public static let preferredSharedMemoryCarveout = FunctionAttribute(rawValue: 9)
}

/// `CUstreamCaptureMode` values (cuda.h).
public struct StreamCaptureMode: RawRepresentable, Hashable, Sendable {
    public var rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public static let global = StreamCaptureMode(rawValue: 0)
    public static let threadLocal = StreamCaptureMode(rawValue: 1)
    public static let relaxed = StreamCaptureMode(rawValue: 2)
}

/// `CUstream_flags` (cuda.h).
public struct StreamFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Does not synchronise with the legacy NULL stream.
    public static let nonBlocking = StreamFlags(rawValue: 0x1)
}

/// `CUevent_flags` (cuda.h).
public struct EventFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let blockingSync = EventFlags(rawValue: 0x1)
    public static let disableTiming = EventFlags(rawValue: 0x2)
}

/// `CUgraphInstantiate_flags` (cuda.h).
public struct GraphInstantiateFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let autoFreeOnLaunch = GraphInstantiateFlags(rawValue: 1)
    public static let upload = GraphInstantiateFlags(rawValue: 2)
    public static let useNodePriority = GraphInstantiateFlags(rawValue: 8)
}
