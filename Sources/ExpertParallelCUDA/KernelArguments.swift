/// Kernel arguments packed the way `cuLaunchKernel` reads them: each value in its own
/// aligned slot, plus the array of slot addresses (`void**`).
///
/// Values must have exactly the kernel parameter's C type: `Int32(n)` for `int`,
/// `UInt64(bytes)` for `unsigned long long`, `DevicePointer` for any pointer.
/// Build it once and update slots with `set(_:at:)` to keep launches allocation-free.
public final class KernelArguments {
    private var slots: [UnsafeMutableRawPointer?] = []
    private var sizes: [Int] = []

    public init() {}

    /// Packs the values in order, e.g. `KernelArguments(dst, src, UInt64(byteCount))`.
    public convenience init<each Value: BitwiseCopyable>(_ value: repeat each Value) {
        self.init()
        repeat append(each value)
    }

    deinit {
        for slot in slots { slot?.deallocate() }
    }

    public var count: Int { slots.count }

    /// Adds the next argument.
    public func append<Value: BitwiseCopyable>(_ value: Value) {
        let slot = UnsafeMutableRawPointer.allocate(
            byteCount: Swift.max(MemoryLayout<Value>.size, 1), alignment: Swift.max(MemoryLayout<Value>.alignment, 8))
        slot.storeBytes(of: value, as: Value.self)
        slots.append(slot)
        sizes.append(MemoryLayout<Value>.size)
    }

    /// Replaces argument `index` with a value of the same size.
    public func set<Value: BitwiseCopyable>(_ value: Value, at index: Int) {
        precondition(sizes[index] == MemoryLayout<Value>.size, "argument \(index) holds \(sizes[index]) bytes, not \(MemoryLayout<Value>.size)")
        slots[index]!.storeBytes(of: value, as: Value.self)
    }

    /// Calls `body` with the `void**` array that `cuLaunchKernel` takes.
    public func withParameterArray<Result>(
        _ body: (UnsafeMutablePointer<UnsafeMutableRawPointer?>?) throws -> Result
    ) rethrows -> Result {
        try slots.withUnsafeMutableBufferPointer { try body($0.baseAddress) }
    }
}
