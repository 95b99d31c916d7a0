import Foundation

/// Per-rank launches of virtual ranks spin on the device until every rank of the call has
/// arrived, so all of a call's launches must reach the GPU while its first ones run. Some driver
/// calls, made by one thread between another thread's per-rank launches, hold those launches back
/// until the work already on the GPU finishes, which it never does: its ranks spin for the ranks
/// held back, until the timeout. A module load or a function's first load (lazy loading, the
/// default since CUDA 12.2) wait for the context so; so does `cuMemFree`: on an H200
/// (2026-12-02), a thread freeing device memory in a loop beside a group stepping per rank cost
/// the group a timeout on 12 of 12 steps, and with this library's allocations and frees taken
/// through this gate the same 12 steps took 5.2 ms in all (allocations, memsets and event
/// creation alone beside cost nothing). So this library's module loads and unloads, eager
/// function loads, allocations and frees (`DriverLibrary.loadModule`, `unload`, `load(_:)`,
/// `allocate`, `allocateHost`, `free`, `freeHost`, `importAllocation`, `unmapImported`,
/// `NCCLLibrary.memAlloc`, `memFree`) and a call's per-rank launch loop take turns,
/// process-wide, through this gate, first come, first served (a ticket lock). Nothing that holds
/// the gate allocates or frees (the lock is not reentrant). Other libraries' frees in the process
/// (a `torch.cuda.empty_cache()`) do not take it: per-rank launches are a mode for tests and for
/// ranks in separate processes; one launch for every rank (the default) has no such window.
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
