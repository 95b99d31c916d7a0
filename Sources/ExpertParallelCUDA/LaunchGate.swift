import Foundation

/// Per-rank launches of virtual ranks spin on the device until every rank of the call has
/// arrived, so all of a call's launches must reach the GPU while its first ones run. Some driver
/// calls may wait for the whole context and hold back other threads' launches while they wait:
/// a module load or a function's first load (lazy loading, the default since CUDA 12.2),
/// `cuMemAlloc` / `cuMemFree` and their host, VMM and IPC forms, `cuCtxSynchronize`. Made by one
/// thread between another thread's per-rank launches, such a call waits for ranks that spin for
/// ranks it keeps from launching, until their timeout (seen on an H200: a thread allocating and
/// freeing beside a group stepping per rank cost that group a timeout at once).
///
/// So those calls of this library (`DriverLibrary`'s device and host allocations and frees,
/// module loads and unloads, function loads and context synchronisation; `NCCLLibrary`'s
/// `ncclMemAlloc` / `ncclMemFree`) and a call's per-rank launch loop take turns, process-wide,
/// through this lock. Calls made by other code in the process (another
/// framework's `cudaFree`, say) do not take it: per-rank launches stay a mode for tests and for
/// ranks in separate processes; one launch for every rank (the default) has no such window.
///
/// The gate serves its callers in the order they came (a ticket lock): a thread that allocates
/// and frees in a tight loop would otherwise take it again and again before a waiting launch
/// loop woke up (seen on an H200: a group stepping per rank beside such a thread made no
/// progress for 90 s behind a plain mutex).
public enum LaunchGate {
    public static let lock = TicketLock()

    /// Runs `body` holding the gate.
    @inline(__always)
    static func turn<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }
}

/// A lock that lets its waiters in first come, first served.
public final class TicketLock: @unchecked Sendable {
    private let condition = NSCondition()
    private var next: UInt64 = 0
    private var serving: UInt64 = 0

    public init() {}

    public func lock() {
        condition.lock()
        let ticket = next
        next &+= 1
        while serving != ticket { condition.wait() }
        condition.unlock()
    }

    public func unlock() {
        condition.lock()
        serving &+= 1
        condition.broadcast()
        condition.unlock()
    }
}
