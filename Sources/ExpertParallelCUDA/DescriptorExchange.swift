import CExpertParallelShim
#if canImport(Glibc)
import Glibc
#endif

/// How the ranks of one host hand each other the POSIX descriptors of their exported
/// allocations: over Unix domain sockets, `SCM_RIGHTS`, with no ptrace permission.
///
/// Each rank makes a `DescriptorExchange` (a listening socket in Linux's abstract namespace,
/// named with 128 random bits, so no other job can guess it), shares `record` (its process id
/// and the name's random part) with the other ranks through the group's all-gather, then calls
/// `exchange` once: it connects to every peer's socket and receives that peer's descriptors,
/// and it sends its own to every peer that connects. A connection is served only when its
/// `SO_PEERCRED` user id is the expected one and its process id is one the all-gather named
/// (each as many times as ranks have it); a socket of a peer is trusted only when the process
/// listening on it is that peer's. Every wait ends by `timeout`. The name disappears when the
/// socket closes (at the end of `exchange`, or `close()`): no file is left behind.
/// The ranks must share a PID namespace and a network namespace (one host, one container).
public final class DescriptorExchange {
    /// A peer as the all-gather described it.
    public struct Peer: Sendable, Hashable {
        public var rank: Int
        public var processID: Int32
        /// The random part of the peer's socket name.
        public var nonce: [UInt64]

        public init(rank: Int, processID: Int32, nonce: [UInt64]) {
            self.rank = rank
            self.processID = processID
            self.nonce = nonce
        }

        /// A peer from the words of its `record`.
        public init(rank: Int, record: some Collection<Int64>) throws(DescriptorExchangeError) {
            let words = Array(record)
            guard words.count == DescriptorExchange.recordCount, let pid = Int32(exactly: words[0]), pid > 0 else {
                throw .malformed(rank: rank, reason: "its all-gathered record \(words) is not [process id, name, name]")
            }
            self.init(rank: rank, processID: pid, nonce: words[1...].map { UInt64(bitPattern: $0) })
        }
    }

    /// The number of words in `record`.
    public static let recordCount = 3
    /// The most descriptors one exchange passes (Linux's `SCM_MAX_FD`).
    public static let maxDescriptors = 253
    static let namePrefix = "expert-parallel-fd-"
    static let magic: Int64 = 0x4550_4644_5843_4831   // "EPFDXCH1"

    /// This process's id and the random part of its socket name: what the peers need.
    public let record: [Int64]
    /// The socket's abstract name without its leading NUL (`/proc/net/unix` shows it after `@`).
    public let name: String
    private var listener: Int32
    private let rank: Int

    /// Binds and listens on a fresh random name. `rank` is this rank (sent with the descriptors).
    public init(rank: Int) throws(DescriptorExchangeError) {
        var generator = SystemRandomNumberGenerator()   // getrandom(2)
        for _ in 0..<4 {
            let nonce = [generator.next() as UInt64, generator.next() as UInt64]
            let name = Self.name(nonce)
            let fd = Self.withName(name) { ep_shim_unix_listen($0, $1, Int32(Self.maxDescriptors + 1)) }
            if fd == -EADDRINUSE { continue }
            guard fd >= 0 else { throw .systemCall(call: "socket/bind/listen(@\(name))", errno: -fd) }
            self.listener = fd
            self.name = name
            self.rank = rank
            record = [Int64(getpid())] + nonce.map { Int64(bitPattern: $0) }
            return
        }
        throw .systemCall(call: "bind(@\(Self.namePrefix)…)", errno: EADDRINUSE)
    }

    deinit { close() }

    /// Closes the listening socket, which removes its name. Idempotent.
    public func close() {
        if listener >= 0 { ep_shim_close_fd(listener) }
        listener = -1
    }

    /// Closes a descriptor this process holds (an exported or a received one).
    public static func closeDescriptor(_ descriptor: Int32) { ep_shim_close_fd(descriptor) }

    /// This process's real user id: whom peers must run as unless told otherwise.
    public static var userID: UInt32 { ep_shim_user_id() }

    /// Sends `mine` to every peer in `peers` (the other ranks; this rank is not among them) and
    /// returns each peer's descriptors by rank, in the order it sent them, as descriptors of this
    /// process (close them when done; every peer must send as many as `mine`). Waits at most
    /// `timeout` in all; closes the socket before it returns or throws. `userID`: the user every
    /// peer must run as (this process's).
    public func exchange(
        _ mine: [ExportedAllocation], with peers: [Peer], timeout: Duration, userID: UInt32 = DescriptorExchange.userID
    ) throws(DescriptorExchangeError) -> [Int: [ExportedAllocation]] {
        defer { close() }
        guard listener >= 0 else { throw .systemCall(call: "exchange (the socket is already closed)", errno: EBADF) }
        guard mine.count <= Self.maxDescriptors else {
            throw .malformed(rank: rank, reason: "\(mine.count) descriptors; at most \(Self.maxDescriptors) may be passed")
        }
        var state = State(peers: peers)
        let message = [Self.magic, Int64(rank), Int64(mine.count)] + mine.map { Int64($0.byteCount) }
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        do {
            let finished = try poll(every: .microseconds(200), for: timeout) { () throws(DescriptorExchangeError) -> Bool in
                try serve(message, descriptors: mine.map(\.fileDescriptor), state: &state, userID: userID, deadline: deadline, clock: clock)
                try connect(state: &state, userID: userID)
                try receive(count: mine.count, state: &state)
                return state.finished
            }
            guard finished else { throw state.timeoutError(timeout) }
        } catch let error as DescriptorExchangeError {
            state.closeAll()
            throw error
        } catch {
            state.closeAll()
            throw .malformed(rank: rank, reason: "\(error)")
        }
        return state.received
    }

    /// What an exchange has done so far.
    private struct State {
        let peers: [Peer]
        /// Process ids still to serve, each with the number of ranks that have it.
        var toServe: [Int32: Int] = [:]
        var toConnect: [Peer]
        var connected: [(peer: Peer, socket: Int32)] = []
        var received: [Int: [ExportedAllocation]] = [:]
        var refused: [String] = []

        init(peers: [Peer]) {
            self.peers = peers
            toConnect = peers
            for p in peers { toServe[p.processID, default: 0] += 1 }
        }

        var finished: Bool { toServe.isEmpty && received.count == peers.count }

        mutating func closeAll() {
            for c in connected { ep_shim_close_fd(c.socket) }
            connected = []
            for (_, list) in received { for e in list { ep_shim_close_fd(e.fileDescriptor) } }
            received = [:]
        }

        func timeoutError(_ timeout: Duration) -> DescriptorExchangeError {
            let notConnected = peers.filter { toServe[$0.processID] != nil }.map(\.rank)
            let unreachable = toConnect.map(\.rank)
            let silent = connected.map(\.peer.rank)
            return .timedOut(
                timeout: timeout, notConnected: notConnected, unreachable: unreachable, silent: silent, refused: refused)
        }
    }

    /// Accepts waiting connections: a permitted one gets this rank's descriptors, any other is
    /// closed unanswered (and named in a later timeout).
    private func serve(
        _ message: [Int64], descriptors: [Int32], state: inout State, userID: UInt32, deadline: ContinuousClock.Instant,
        clock: ContinuousClock
    ) throws(DescriptorExchangeError) {
        while true {
            let socket = ep_shim_unix_accept(listener)
            if socket == -EAGAIN || socket == -EWOULDBLOCK || socket == -EINTR || socket == -ECONNABORTED { return }
            guard socket >= 0 else { throw .systemCall(call: "accept4(@\(name))", errno: -socket) }
            defer { ep_shim_close_fd(socket) }
            var pid: Int32 = 0, uid: UInt32 = 0
            let asked = ep_shim_peer_credentials(socket, &pid, &uid)
            guard asked == 0 else { throw .systemCall(call: "getsockopt(SO_PEERCRED)", errno: -asked) }
            guard uid == userID, let left = state.toServe[pid] else {
                let why = uid != userID ? "user \(uid), not \(userID)" : "not a rank's process"
                state.refused.append("pid \(pid) (\(why))")
                continue
            }
            let remaining = clock.now < deadline ? (deadline - clock.now) : .zero
            let milliseconds = Int32(min(Double(Int32.max), max(1, (remaining / .milliseconds(1)).rounded(.up))))
            let sent = message.withUnsafeBytes { bytes in
                descriptors.withUnsafeBufferPointer { fds in
                    ep_shim_send_descriptors(socket, bytes.baseAddress, Int32(bytes.count), fds.baseAddress, Int32(fds.count), milliseconds)
                }
            }
            guard sent == message.count * 8 else {
                throw .systemCall(call: "sendmsg(SCM_RIGHTS) to pid \(pid)", errno: sent < 0 ? -sent : Int32(EIO))
            }
            state.toServe[pid] = left > 1 ? left - 1 : nil
        }
    }

    /// Connects to the peers not yet reached, each checked to be the process its rank named.
    private func connect(state: inout State, userID: UInt32) throws(DescriptorExchangeError) {
        var waiting: [Peer] = []
        for peer in state.toConnect {
            let name = Self.name(peer.nonce)
            let socket = Self.withName(name) { ep_shim_unix_connect($0, $1) }
            // Not listening yet, or its backlog full: try again on the next round.
            if socket == -ECONNREFUSED || socket == -EAGAIN || socket == -ENOENT || socket == -EINTR {
                waiting.append(peer)
                continue
            }
            guard socket >= 0 else { throw .systemCall(call: "connect(@\(name)) to rank \(peer.rank)", errno: -socket) }
            var pid: Int32 = 0, uid: UInt32 = 0
            let asked = ep_shim_peer_credentials(socket, &pid, &uid)
            guard asked == 0 else {
                ep_shim_close_fd(socket)
                throw .systemCall(call: "getsockopt(SO_PEERCRED)", errno: -asked)
            }
            guard pid == peer.processID, uid == userID else {
                ep_shim_close_fd(socket)
                throw .wrongPeer(rank: peer.rank, expectedProcess: peer.processID, process: pid, expectedUser: userID, user: uid)
            }
            state.connected.append((peer, socket))
        }
        state.toConnect = waiting
    }

    /// Reads the peers' messages that have arrived.
    private func receive(count: Int, state: inout State) throws(DescriptorExchangeError) {
        let words = 3 + count
        var index = 0
        while index < state.connected.count {
            let (peer, socket) = state.connected[index]
            var buffer = [Int64](repeating: 0, count: words + 1)   // one more: a longer message is caught
            var fds = [Int32](repeating: -1, count: max(1, count))
            var taken: Int32 = 0
            let got = buffer.withUnsafeMutableBytes { bytes in
                fds.withUnsafeMutableBufferPointer { out in
                    ep_shim_receive_descriptors(socket, bytes.baseAddress, Int32(bytes.count), out.baseAddress, Int32(count), &taken)
                }
            }
            if got == -EAGAIN || got == -EWOULDBLOCK || got == -EINTR {
                index += 1
                continue
            }
            state.connected.remove(at: index)
            ep_shim_close_fd(socket)
            let descriptors = Array(fds.prefix(Int(taken)))
            func fail(_ reason: String) -> DescriptorExchangeError {
                for fd in descriptors { ep_shim_close_fd(fd) }
                return .malformed(rank: peer.rank, reason: reason)
            }
            if got == -EMSGSIZE { throw fail("it sent more than \(count) descriptors") }
            guard got >= 0 else { throw fail("recvmsg failed: errno \(-got)") }
            guard got > 0 else { throw fail("it closed the connection without sending its descriptors (did it refuse this process?)") }
            guard got == words * 8, buffer[0] == Self.magic, buffer[1] == Int64(peer.rank), buffer[2] == Int64(count) else {
                throw fail("a message of \(got) bytes that is not rank \(peer.rank)'s \(count) descriptors")
            }
            guard taken == count else { throw fail("\(taken) descriptors instead of \(count)") }
            var list: [ExportedAllocation] = []
            for (i, fd) in descriptors.enumerated() {
                guard let bytes = Int(exactly: buffer[3 + i]), bytes > 0 else { throw fail("byte count \(buffer[3 + i]) for descriptor \(i)") }
                list.append(ExportedAllocation(fileDescriptor: fd, byteCount: bytes))
            }
            state.received[peer.rank] = list
        }
    }

    static func name(_ nonce: [UInt64]) -> String {
        namePrefix + nonce.map { word in
            let digits = String(word, radix: 16)
            return String(repeating: "0", count: 16 - digits.count) + digits
        }.joined()
    }

    private static func withName(_ name: String, _ body: (UnsafePointer<CChar>, Int32) -> Int32) -> Int32 {
        let bytes = Array(name.utf8CString.dropLast())   // no terminator: abstract names are counted
        return bytes.withUnsafeBufferPointer { body($0.baseAddress!, Int32($0.count)) }
    }
}

/// How a descriptor exchange failed, naming the ranks and processes involved.
public enum DescriptorExchangeError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A system call failed with `errno`.
    case systemCall(call: String, errno: Int32)
    /// `timeout` passed first. `notConnected`: ranks whose process never connected here;
    /// `unreachable`: ranks whose socket this rank could not reach; `silent`: ranks reached that
    /// did not send their descriptors; `refused`: connections turned away (wrong user or process).
    case timedOut(timeout: Duration, notConnected: [Int], unreachable: [Int], silent: [Int], refused: [String])
    /// The socket named by rank `rank` is held by another process or user than that rank's.
    case wrongPeer(rank: Int, expectedProcess: Int32, process: Int32, expectedUser: UInt32, user: UInt32)
    /// Rank `rank` sent something other than its descriptors.
    case malformed(rank: Int, reason: String)

    public var description: String {
        switch self {
        case let .systemCall(call, errno):
            return "descriptor exchange: \(call) failed: \(String(cString: strerror(errno))) (errno \(errno))"
        case let .timedOut(timeout, notConnected, unreachable, silent, refused):
            var parts: [String] = []
            if !notConnected.isEmpty { parts.append("rank(s) \(notConnected) never connected") }
            if !unreachable.isEmpty { parts.append("rank(s) \(unreachable) could not be reached") }
            if !silent.isEmpty { parts.append("rank(s) \(silent) did not send their descriptors") }
            if !refused.isEmpty { parts.append("refused \(refused.joined(separator: ", "))") }
            return "descriptor exchange timed out after \(timeout): " + parts.joined(separator: "; ")
        case let .wrongPeer(rank, expectedProcess, process, expectedUser, user):
            return "descriptor exchange: rank \(rank)'s socket is held by pid \(process) user \(user), not rank \(rank)'s pid \(expectedProcess) user \(expectedUser); refused"
        case let .malformed(rank, reason):
            return "descriptor exchange: rank \(rank): \(reason)"
        }
    }
}

extension ExportedAllocation {
    /// A descriptor of this process and the size of the allocation it exports (for callers
    /// outside this module, which the memberwise initializer is not public to).
    public init(descriptor: Int32, byteCount: Int) {
        self.init(fileDescriptor: descriptor, byteCount: byteCount)
    }
}
