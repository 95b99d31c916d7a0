import CExpertParallelShim
import ExpertParallelCUDA
import Foundation
import Testing

/// The NCCL ranks' descriptor exchange (`DescriptorExchange`: Unix sockets in the abstract
/// namespace, `SCM_RIGHTS`, peers checked by `SO_PEERCRED`), run on the CPU with real
/// descriptors. `PeerBuffers` passes its exported GPU allocations through exactly this code; the
/// GPU import after it (`cuMemImportFromShareableHandle`) needs a GPU: two processes on one GPU
/// run it in `DescriptorImportTwoProcessTests` (ExpertParallelGPUTests, EP_GPU_TESTS=1).
struct DescriptorExchangeTests {
    /// Three ranks on three threads, each sharing a pipe's write end and an unlinked temporary
    /// file: every rank receives every peer's, new descriptors of the same open files (same
    /// device and inode; bytes written through a received pipe end come out of the sender's read
    /// end), close-on-exec, with the byte counts sent; the socket names are gone afterwards.
    @Test func threeRanksReceiveEveryPeersDescriptors() throws {
        let ranks = 3
        let owned = try (0..<ranks).map { _ in try Self.descriptors() }
        defer { for o in owned { close(o.read); close(o.write); close(o.file) } }
        let shared = owned.enumerated().map { r, o in
            [ExportedAllocation(descriptor: o.write, byteCount: 4096 * (r + 1)),
             ExportedAllocation(descriptor: o.file, byteCount: 4096 * (r + 1) + 1)]
        }
        let exchanges = try (0..<ranks).map { try DescriptorExchange(rank: $0) }
        let names = exchanges.map(\.name)
        for name in names { #expect(Self.listedSockets().contains("@" + name)) }
        let records = exchanges.flatMap(\.record)   // what the all-gather hands every rank
        let handed = exchanges.map { Handoff(value: $0) }
        let results = Self.onThreads(ranks) { r in
            Result { () throws(DescriptorExchangeError) -> [Int: [ExportedAllocation]] in
                let peers = try (0..<ranks).filter { $0 != r }.map { p throws(DescriptorExchangeError) in
                    try DescriptorExchange.Peer(rank: p, record: records[(p * 3)..<(p * 3 + 3)])
                }
                return try handed[r].value.exchange(shared[r], with: peers, timeout: .seconds(10))
            }
        }
        for name in names { #expect(!Self.listedSockets().contains("@" + name)) }
        for r in 0..<ranks {
            let received = try results[r].get()
            defer { for list in received.values { for e in list { close(e.fileDescriptor) } } }
            #expect(received.keys.sorted() == (0..<ranks).filter { $0 != r })
            for (p, list) in received {
                #expect(list.map(\.byteCount) == shared[p].map(\.byteCount))
                for (mine, theirs) in zip(list, shared[p]) {
                    #expect(mine.fileDescriptor != theirs.fileDescriptor)
                    #expect(try Self.identity(mine.fileDescriptor) == Self.identity(theirs.fileDescriptor))
                    #expect(fcntl(mine.fileDescriptor, F_GETFD) & FD_CLOEXEC != 0)
                }
                // Through the received pipe end into rank p's pipe.
                let message = Array("rank \(r) to rank \(p)".utf8)
                #expect(message.withUnsafeBytes { write(list[0].fileDescriptor, $0.baseAddress, $0.count) } == message.count)
                var back = [UInt8](repeating: 0, count: message.count)
                #expect(back.withUnsafeMutableBytes { read(owned[p].read, $0.baseAddress, $0.count) } == message.count)
                #expect(back == message)
            }
        }
    }

    /// A peer that never connects (its socket listens, nobody serves it) ends the wait at the
    /// timeout with an error naming it, and the socket name is removed.
    @Test func aPeerThatNeverConnectsTimesOutNamingIt() throws {
        let (write, file) = try Self.pair()
        defer { close(write); close(file) }
        let exchange = try DescriptorExchange(rank: 0)
        let silent = try DescriptorExchange(rank: 1)   // listens, never exchanges
        let name = exchange.name
        let clock = ContinuousClock()
        let start = clock.now
        #expect(throws: DescriptorExchangeError.timedOut(
            timeout: .milliseconds(300), notConnected: [1], unreachable: [], silent: [1], refused: [])
        ) {
            _ = try exchange.exchange(
                [ExportedAllocation(descriptor: write, byteCount: 1)],
                with: [try DescriptorExchange.Peer(rank: 1, record: silent.record)], timeout: .milliseconds(300))
        }
        let waited = clock.now - start
        #expect(waited >= .milliseconds(300) && waited < .seconds(5))
        #expect(!Self.listedSockets().contains("@" + name))
        silent.close()
        #expect(!Self.listedSockets().contains("@" + silent.name))
    }

    /// A peer whose socket nobody listens on is reported as unreachable; the error's text names
    /// the ranks and the timeout.
    @Test func anUnreachablePeerIsNamed() throws {
        let exchange = try DescriptorExchange(rank: 0)
        let nobody = DescriptorExchange.Peer(rank: 2, processID: getpid(), nonce: [1, 2])
        do throws(DescriptorExchangeError) {
            _ = try exchange.exchange([], with: [nobody], timeout: .milliseconds(100))
            Issue.record("no timeout")
        } catch {
            #expect(error == .timedOut(timeout: .milliseconds(100), notConnected: [2], unreachable: [2], silent: [], refused: []))
            #expect("\(error)".contains("timed out after 0.1 seconds"))
            #expect("\(error)".contains("rank(s) [2] never connected"))
            #expect("\(error)".contains("rank(s) [2] could not be reached"))
        }
    }

    /// A rank's socket held by a process other than the one that rank named (here: this
    /// process, where the all-gather said pid 999999) is not trusted: nothing is read from it.
    @Test func aSocketHeldByAnotherProcessIsRefused() throws {
        let exchange = try DescriptorExchange(rank: 0)
        let squatter = try DescriptorExchange(rank: 1)
        defer { squatter.close() }
        let claimed = DescriptorExchange.Peer(rank: 1, processID: 999_999, nonce: try DescriptorExchange.Peer(rank: 1, record: squatter.record).nonce)
        #expect(throws: DescriptorExchangeError.wrongPeer(
            rank: 1, expectedProcess: 999_999, process: getpid(), expectedUser: DescriptorExchange.userID, user: DescriptorExchange.userID)
        ) {
            _ = try exchange.exchange([], with: [claimed], timeout: .seconds(5))
        }
        #expect(!Self.listedSockets().contains("@" + exchange.name))
    }

    /// Another process that connects but whose pid the all-gather did not name gets nothing:
    /// the connection is closed unanswered, and the timeout names the refused pid.
    @Test func aProcessThatIsNotARankGetsNothing() throws {
        let (write, file) = try Self.pair()
        defer { close(write); close(file) }
        let exchange = try DescriptorExchange(rank: 0)
        let child = Self.spawnConnector(to: exchange.name, as: DescriptorExchange.userID)
        #expect(child > 0)
        let expected = DescriptorExchange.Peer(rank: 1, processID: 999_999, nonce: [3, 4])   // never connects
        do throws(DescriptorExchangeError) {
            _ = try exchange.exchange([ExportedAllocation(descriptor: write, byteCount: 1)], with: [expected], timeout: .seconds(1))
            Issue.record("no timeout")
        } catch {
            guard case let .timedOut(_, notConnected, _, _, refused) = error else { Issue.record("\(error)"); return }
            #expect(notConnected == [1])
            #expect(refused == ["pid \(child) (not a rank's process)"])
        }
        #expect(ep_shim_test_wait_child(child) == 0)   // 0: closed without descriptors
    }

    /// A process of another user is refused even when its pid is a rank's (a real other user
    /// where this runs as root; otherwise this process connects and the expected user is
    /// another one, which takes the same check).
    @Test func aProcessOfAnotherUserGetsNothing() throws {
        let (write, file) = try Self.pair()
        defer { close(write); close(file) }
        let exchange = try DescriptorExchange(rank: 0)
        let me = DescriptorExchange.userID
        let other: UInt32 = me == 0 ? 65534 : me
        let expectedUser: UInt32 = me == 0 ? me : me &+ 1
        let child = Self.spawnConnector(to: exchange.name, as: other)
        #expect(child > 0)
        let rank1 = DescriptorExchange.Peer(rank: 1, processID: child, nonce: [5, 6])   // its pid, its (unreachable) socket
        do throws(DescriptorExchangeError) {
            _ = try exchange.exchange(
                [ExportedAllocation(descriptor: write, byteCount: 1)], with: [rank1], timeout: .seconds(1), userID: expectedUser)
            Issue.record("no timeout")
        } catch {
            guard case let .timedOut(_, notConnected, _, _, refused) = error else { Issue.record("\(error)"); return }
            #expect(notConnected == [1])
            #expect(refused == ["pid \(child) (user \(other), not \(expectedUser))"])
        }
        #expect(ep_shim_test_wait_child(child) == 0)
    }

    /// With no peers the exchange returns at once, and removes the socket name.
    @Test func aSingleRankExchangesNothing() throws {
        let exchange = try DescriptorExchange(rank: 0)
        #expect(Self.listedSockets().contains("@" + exchange.name))
        #expect(exchange.name.hasPrefix("expert-parallel-fd-") && exchange.name.count == 19 + 32)
        #expect(exchange.record.count == DescriptorExchange.recordCount && exchange.record[0] == Int64(getpid()))
        #expect(try exchange.exchange([], with: [], timeout: .seconds(1)).isEmpty)
        #expect(!Self.listedSockets().contains("@" + exchange.name))
        #expect(throws: DescriptorExchangeError.self) { _ = try exchange.exchange([], with: [], timeout: .seconds(1)) }
    }

    @Test func aRecordThatIsNotOneIsRefused() {
        #expect(throws: DescriptorExchangeError.self) { _ = try DescriptorExchange.Peer(rank: 1, record: [Int64(1), 2]) }
        #expect(throws: DescriptorExchangeError.self) { _ = try DescriptorExchange.Peer(rank: 1, record: [Int64(-5), 2, 3]) }
    }

    // MARK: - Helpers

    /// A pipe and an unlinked temporary file.
    static func descriptors() throws -> (read: Int32, write: Int32, file: Int32) {
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else { throw POSIXError(.EMFILE) }
        var template = Array("/tmp/h9-exchange-XXXXXX".utf8CString)
        let file = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard file >= 0 else { throw POSIXError(.EMFILE) }
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        return (ends[0], ends[1], file)
    }

    /// A pipe's write end (its read end closed) and a temporary file, for tests that only send.
    static func pair() throws -> (write: Int32, file: Int32) {
        let d = try descriptors()
        close(d.read)
        return (d.write, d.file)
    }

    /// The device and inode a descriptor refers to.
    static func identity(_ descriptor: Int32) throws -> [UInt64] {
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { throw POSIXError(.EBADF) }
        return [UInt64(info.st_dev), UInt64(info.st_ino)]
    }

    /// The Unix sockets the kernel lists (abstract names start with `@`).
    static func listedSockets() -> Set<String> {
        guard let table = try? String(contentsOfFile: "/proc/net/unix", encoding: .utf8) else { return [] }
        return Set(table.split(separator: "\n").dropFirst().compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            return fields.count >= 8 ? String(fields[7]) : nil
        })
    }

    static func spawnConnector(to name: String, as uid: UInt32) -> Int32 {
        let bytes = Array(name.utf8CString.dropLast())
        return bytes.withUnsafeBufferPointer { ep_shim_test_spawn_connector($0.baseAddress, Int32($0.count), uid) }
    }

    /// Runs `body(0..<count)` on `count` threads of their own (each blocks in its exchange) and
    /// returns their results in order.
    static func onThreads<T: Sendable>(_ count: Int, _ body: @escaping @Sendable (Int) -> T) -> [T] {
        let results = Results<T>(count)
        let done = DispatchSemaphore(value: 0)
        for i in 0..<count {
            Thread {
                results.set(i, body(i))
                done.signal()
            }.start()
        }
        for _ in 0..<count { done.wait() }
        return results.values.map { $0! }
    }

    final class Results<T>: @unchecked Sendable {
        private let lock = NSLock()
        private var slots: [T?]
        init(_ count: Int) { slots = Array(repeating: nil, count: count) }
        func set(_ i: Int, _ value: T) { lock.withLock { slots[i] = value } }
        var values: [T?] { lock.withLock { slots } }
    }
}

/// Hands a value that one thread at a time uses to another thread.
struct Handoff<T>: @unchecked Sendable {
    let value: T
}
