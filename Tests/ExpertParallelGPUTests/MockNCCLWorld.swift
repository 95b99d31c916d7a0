import Foundation

/// Communicators of several ranks over the mock NCCL, every rank a thread of this process: the
/// collectives the groups make while they join (`ncclAllGather`, `ncclCommWindowRegister`) meet
/// there, and a peer's window is where that peer's buffer is (`ncclGetPeerDevicePointer`), as
/// NCCL 2.29 maps it. So CI builds an NCCL rank group of R > 1 and checks what each rank
/// launches; the kernels do not run.
///
/// A communicator's address says which it is: `comm(rank:of:world:)`. Any other address (the
/// single-rank tests' `0xCC_0000`) is a communicator of one rank.
enum MockNCCLWorld {
    private static let tag: UInt = 0xC
    /// The communicator of `rank` of `ranks` (1...255) in world `world` (0...4095).
    static func comm(rank: Int, of ranks: Int, world: Int) -> OpaquePointer {
        OpaquePointer(bitPattern: tag << 28 | UInt(world) << 16 | UInt(ranks) << 8 | UInt(rank))!
    }

    /// (world, rank, ranks) of a communicator `comm(rank:of:world:)` made; nil for any other.
    static func decode(_ comm: OpaquePointer?) -> (world: Int, rank: Int, ranks: Int)? {
        let value = UInt(bitPattern: comm)
        guard value >> 28 == tag else { return nil }
        return (Int(value >> 16 & 0xFFF), Int(value & 0xFF), Int(value >> 8 & 0xFF))
    }

    /// One world's meeting point: each collective waits (at most `patience`) until every rank
    /// has brought its part, then every rank leaves with all of them in rank order.
    final class Meeting {
        let ranks: Int
        private let condition = NSCondition()
        private var generation = 0
        private var parts: [Int: [UInt8]] = [:]
        private var result: [[UInt8]] = []

        init(ranks: Int) { self.ranks = ranks }

        /// Every rank's `part`, by rank; nil where the others did not come within `patience`.
        func allGather(rank: Int, _ part: [UInt8], patience: TimeInterval = 10) -> [[UInt8]]? {
            condition.lock()
            defer { condition.unlock() }
            let mine = generation
            parts[rank] = part
            if parts.count == ranks {
                // Ranks that called different collectives (their parts' sizes differ) all fail.
                let sizes = Set(parts.values.map(\.count))
                result = sizes.count == 1 ? (0..<ranks).map { parts[$0]! } : []
                parts = [:]
                generation += 1
                condition.broadcast()
                return result
            }
            let deadline = Date(timeIntervalSinceNow: patience)
            while generation == mine {
                if !condition.wait(until: deadline), generation == mine {   // (the last rank may have come as the wait ran out)
                    parts[rank] = nil
                    return nil
                }
            }
            return result   // the next generation cannot finish without this rank: still this one's
        }
    }

    /// A registered window: its world, rank, place in that rank's registrations and address.
    struct Window { let world: Int, rank: Int, index: Int, address: UInt }

    private static let lock = NSLock()
    nonisolated(unsafe) private static var meetings: [Int: Meeting] = [:]
    nonisolated(unsafe) private static var windows: [UInt: Window] = [:]
    nonisolated(unsafe) private static var registered: [UInt: Int] = [:]   // windows so far, by communicator
    nonisolated(unsafe) private static var nextWindow: UInt = 0xB_0000

    static func meeting(_ world: Int, ranks: Int) -> Meeting {
        lock.withLock {
            if let m = meetings[world], m.ranks == ranks { return m }
            let m = Meeting(ranks: ranks)
            meetings[world] = m
            return m
        }
    }

    /// `ncclAllGather` of `bytes` bytes a rank on a communicator of several; false if a rank stayed away.
    static func allGather(_ comm: OpaquePointer?, _ send: UnsafeRawPointer?, _ receive: UnsafeMutableRawPointer?, bytes: Int) -> Bool {
        guard let (world, rank, ranks) = decode(comm) else { return false }
        let part = send.map { Array(UnsafeRawBufferPointer(start: $0, count: bytes)) } ?? Array(repeating: 0, count: bytes)
        guard let all = meeting(world, ranks: ranks).allGather(rank: rank, part), all.count == ranks else { return false }
        if let receive { for (r, bytesOfRank) in all.enumerated() { bytesOfRank.withUnsafeBytes { receive.advanced(by: r * bytes).copyMemory(from: $0.baseAddress!, byteCount: bytes) } } }
        return true
    }

    /// Registers `address` as this rank's next window (collective, as NCCL's is); its handle.
    static func register(_ comm: OpaquePointer?, _ address: UnsafeMutableRawPointer?) -> OpaquePointer? {
        guard let (world, rank, ranks) = decode(comm) else { return OpaquePointer(bitPattern: 0xA_0000) }
        let handle: UInt = lock.withLock {
            let index = registered[UInt(bitPattern: comm), default: 0]
            registered[UInt(bitPattern: comm)] = index + 1
            nextWindow += 16
            windows[nextWindow] = Window(world: world, rank: rank, index: index, address: UInt(bitPattern: address))
            return nextWindow
        }
        guard meeting(world, ranks: ranks).allGather(rank: rank, [])?.count == ranks else { return nil }
        return OpaquePointer(bitPattern: handle)
    }

    /// Where `peer`'s buffer of the same window is (its own address: every rank is in this
    /// process), or nil where there is none.
    static func peerPointer(_ window: OpaquePointer?, offset: Int, peer: Int) -> UnsafeMutableRawPointer? {
        lock.withLock {
            guard let w = windows[UInt(bitPattern: window)],
                  let other = windows.values.first(where: { $0.world == w.world && $0.rank == peer && $0.index == w.index }) else { return nil }
            return UnsafeMutableRawPointer(bitPattern: other.address + UInt(offset))
        }
    }

    /// Forgets every world (MockCUDA.run's reset).
    static func reset() {
        lock.withLock {
            meetings = [:]
            windows = [:]
            registered = [:]
        }
    }
}
