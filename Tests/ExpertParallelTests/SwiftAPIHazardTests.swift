import ExpertParallel
import Foundation
import Testing

/// What a Swift caller of the host group meets on a mistake: a thrown, named error or a
/// precondition that names both sides, never a silent reinterpretation or a wait.
@Suite("Swift API hazards")
struct SwiftAPIHazardTests {
    static let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .f32, maxTokensPerRank: 2,
                                    timeout: .seconds(2))

    @Test("run(ranks:) with a rank outside the group or named twice fails every entry by name and runs nothing")
    func runRefusesBadRanks() throws {
        let group = try HostGroup(Self.config)
        let ran = Counter()
        let outside = group.run(ranks: [0, 5]) { _ throws(EPError) in ran.add() }
        #expect(outside.count == 2)
        for result in outside {
            #expect(throws: EPError.invalidArgument(field: "ranks[1]", value: "5", requirement: "must be in 0..<2")) { try result.get() }
        }
        let start = ContinuousClock.now
        let twice = group.run(ranks: [0, 0, 1]) { rank throws(EPError) in ran.add() }
        for result in twice {
            #expect(throws: EPError.invalidArgument(field: "ranks[1]", value: "0", requirement: "must be named once (each rank runs on one thread)")) {
                try result.get()
            }
        }
        #expect(ContinuousClock.now - start < .seconds(1), "refused at once, not after the timeout")
        #expect(ran.value == 0)
        #expect(try group.activeRanks == .all(2), "no rank was masked")
        #expect(group.run(ranks: [1, 0]) { rank throws(EPError) in rank.rank }.map { try? $0.get() } == [1, 0])
    }

    static func routing(_ ranks: Int) throws -> [HostTensor] {
        try (0..<ranks).map { r in
            let idx = try HostTensor(.i32, [2, 2])
            try idx.copy(from: [Int32(r), Int32(2 + r), Int32(1 - r), -1])
            return idx
        }
    }

    @Test("a per-rank call made on one rank alone puts the ranks out of step: the group's next call says so at once and masks no rank; after clean it runs")
    func outOfStepIsNamedAtOnce() throws {
        let group = try HostGroup(Self.config)
        let idx = try Self.routing(2)
        let handle = try group.makeHandle()
        try group.update(handle, topkIdx: idx.map(\.ref))
        // Rank 0 alone: its call is refused (a wrong K) and takes its round; rank 1 makes none.
        let bad = try HostTensor(.i32, [2, 3])
        #expect(throws: EPError.self) { try group[0].update(try group[0].makeHandle(), topkIdx: bad.ref) }
        let start = ContinuousClock.now
        #expect(throws: EPError.wrongOrder(
            "the ranks' calls are out of step (rounds taken since the group was made or last cleaned: rank 0: 2, rank 1: 1): a per-rank call was made on some ranks without the others' matching calls; clean the group to start afresh")) {
            try group.update(handle, topkIdx: idx.map(\.ref))
        }
        #expect(ContinuousClock.now - start < .seconds(1), "at once, not after the 2 s timeout")
        #expect(try group.activeRanks == .all(2), "no rank was masked")
        try group.clean(ranks: .all(2))
        try group.update(handle, topkIdx: idx.map(\.ref))
    }

    @Test("a second call of a rank while one is under way on another thread is refused by name and takes no round")
    func oneCallPerRankAtATime() throws {
        let group = try HostGroup(Self.config)
        let idx = try Self.routing(2)
        let first = try group[0].makeHandle(), second = try group[0].makeHandle(), other = try group[1].makeHandle()
        let waiting = DispatchSemaphore(value: 0), done = DispatchSemaphore(value: 0)
        let firstResult = ResultBox()
        Thread {
            waiting.signal()
            firstResult.set(Result { () throws(EPError) in try group[0].update(first, topkIdx: idx[0].ref) })   // waits for rank 1
            done.signal()
        }.start()
        waiting.wait()
        Thread.sleep(forTimeInterval: 0.2)   // rank 0's first call is in its exchange now
        #expect(throws: EPError.wrongOrder(
            "rank 0 already has a call under way on another thread: a rank makes its calls one at a time (its handles take turns)")) {
            try group[0].update(second, topkIdx: idx[0].ref)
        }
        try group[1].update(other, topkIdx: idx[1].ref)
        done.wait()
        try firstResult.get()
        #expect(try group.activeRanks == .all(2))
        let handles = [second, other]   // rank 0's second handle has its turn now; rank 1 matches it
        for result in group.run({ rank throws(EPError) in try rank.update(handles[rank.rank], topkIdx: idx[rank.rank].ref) }) {
            try result.get()
        }
    }

    @Test("RankMask.all of zero or fewer ranks is empty")
    func emptyMasks() {
        #expect(RankMask.all(0).count == 0)
        #expect(RankMask.all(-1).count == 0)
        #expect(RankMask.all(Int.min).bits == 0)
        #expect(RankMask.all(64).count == 64 && RankMask.all(1000).count == 64)
    }

    @Test("an error's localizedDescription is its description (the field, the value and the bound)")
    func localizedDescription() {
        let error: any Error = EPError.invalidArgument(field: "topkIdx[0][1]", value: "9", requirement: "must be in -1..<4")
        #expect(error.localizedDescription == "invalid argument: topkIdx[0][1] = 9; must be in -1..<4")
    }

    @Test("HostTensor reads and writes elements of its own size")
    func hostTensorElements() throws {
        let ids = try HostTensor(.i32, [2, 2])
        try ids.copy(from: [Int32(1), 2, 3, -1])
        #expect(try ids.array(of: Int32.self) == [1, 2, 3, -1])
        ids[as: Int32.self, 3] = 7
        #expect(ids[as: Int32.self, 3] == 7)
        let bits = try HostTensor(.bf16, [1, 4])
        try bits.copy(from: [UInt16](repeating: 0x3F80, count: 4))
        #expect(try bits.array(of: UInt16.self).count == 4)
        #expect(try HostTensor(.f32, [0, 4]).array(of: Float.self).isEmpty)
        let raw = try HostTensor(.f32, [2])
        try raw.copy(from: [UInt8](repeating: 0, count: 4) + [0x00, 0x00, 0x80, 0x3F])   // raw bytes: 0.0, 1.0
        #expect(try raw.array(of: Float.self) == [0, 1])
    }

    @Test("HostTensor.copy(from:) refuses an element of another size or a wrong count by name and writes nothing")
    func hostTensorCopyRefusals() throws {
        let ids = try HostTensor(.i32, [2, 2])
        try ids.copy(from: [Int32(1), 2, 3, 4])
        let before = ids.bytes()
        // [Int]: 8-byte elements, 16 bytes like the tensor's (a raw copy would fill it with halves of 64-bit values).
        #expect(throws: EPError.invalidArgument(field: "values", value: "[Int] (8-byte elements)",
                                                requirement: "must have elements of 4 bytes, the size of this tensor's i32 elements, or be [UInt8] (its raw bytes)")) {
            try ids.copy(from: [1, 2])
        }
        #expect(throws: EPError.invalidArgument(field: "values.count", value: "3",
                                                requirement: "must equal the element count (4) of this i32[2, 2] tensor")) {
            try ids.copy(from: [Int32(9), 9, 9])
        }
        #expect(throws: EPError.invalidArgument(field: "values.count", value: "5",
                                                requirement: "must equal the element count (4) of this i32[2, 2] tensor")) {
            try ids.copy(from: [Int32](repeating: 9, count: 5))
        }
        // Raw bytes: the tensor's byte count of them, not its element count.
        #expect(throws: EPError.invalidArgument(field: "values.count", value: "4",
                                                requirement: "must equal the byte count (16) of this i32[2, 2] tensor, for its raw bytes")) {
            try ids.copy(from: [UInt8](repeating: 0xFF, count: 4))
        }
        #expect(ids.bytes() == before, "nothing was written")
        let rows = try HostTensor(.f32, [1, 8])
        #expect(throws: EPError.invalidArgument(field: "values.count", value: "2",
                                                requirement: "must equal the element count (8) of this f32[1, 8] tensor")) {
            try rows.copy(from: [Float(1), 2])
        }
        #expect(throws: EPError.invalidArgument(field: "values", value: "[Double] (8-byte elements)",
                                                requirement: "must have elements of 4 bytes, the size of this tensor's f32 elements, or be [UInt8] (its raw bytes)")) {
            try rows.copy(from: [Double](repeating: 1, count: 8))
        }
        #expect(rows.bytes() == [UInt8](repeating: 0, count: 32), "nothing was written")
        // An empty tensor takes an empty array.
        try HostTensor(.f32, [0, 4]).copy(from: [Float]())
    }

    @Test("HostTensor.array(of:) refuses a type of another size by name")
    func hostTensorArrayRefusal() throws {
        #expect(throws: EPError.invalidArgument(field: "type", value: "Float (4 bytes)", requirement: "must be 2 bytes, the size of this tensor's bf16 elements")) {
            _ = try HostTensor(.bf16, [1, 4]).array(of: Float.self)
        }
        #expect(throws: EPError.invalidArgument(field: "type", value: "Int (8 bytes)", requirement: "must be 4 bytes, the size of this tensor's i32 elements")) {
            _ = try HostTensor(.i32, [0]).array(of: Int.self)
        }
    }

    #if !os(Windows)
    @Test("HostTensor's element subscript traps, naming both sides, on an index out of range or an element of another size (like an array's)")
    func hostTensorSubscriptPreconditions() async {
        await #expect(processExitsWith: .failure) { _ = try HostTensor(.f32, [2])[as: Float.self, 2] }
        await #expect(processExitsWith: .failure) { _ = try HostTensor(.f32, [2])[as: Float.self, -1] }
        await #expect(processExitsWith: .failure) { _ = try HostTensor(.bf16, [2])[as: Float.self, 0] }
    }
    #endif

    @Test("RoutingTable[token, k] refuses a column past topK (it read the next token's entry) or a token out of range by name")
    func routingTableSubscript() throws {
        let table = try RoutingTable(experts: [0, 1, 2, 3], tokens: 2, config: Self.config)
        #expect(try table[1, 0] == 2 && table[1, 1] == 3)
        for k in [2, -1, Int.max] {
            #expect(throws: EPError.invalidArgument(field: "k", value: "\(k)", requirement: "must be in 0..<2 (topK)")) { try table[0, k] }
        }
        for token in [2, -1, Int.min] {
            #expect(throws: EPError.invalidArgument(field: "token", value: "\(token)", requirement: "must be in 0..<2 (the table's tokens)")) {
                try table[token, 0]
            }
        }
    }

    @Test("HostGroup[rank] and HostGroup.rank(_:) refuse a rank outside the group by name")
    func rankAccessorThrows() throws {
        let group = try HostGroup(Self.config)
        #expect(try group.rank(1).rank == 1)
        #expect(try group[1].rank == 1)
        for bad in [2, -1, Int.min] {
            #expect(throws: EPError.invalidArgument(field: "rank", value: "\(bad)", requirement: "must be in 0..<2")) { try group.rank(bad) }
            #expect(throws: EPError.invalidArgument(field: "rank", value: "\(bad)", requirement: "must be in 0..<2")) { try group[bad] }
        }
        #expect(group.ranks.map(\.rank) == [0, 1])
    }

    @Test("HostTensor refuses a negative size or bytes past Int.max by name, and more bytes than this host has as outOfMemory, instead of trapping")
    func hostTensorShapes() throws {
        #expect(throws: EPError.invalidArgument(field: "shape[0]", value: "-1", requirement: "must be ≥ 0")) { try HostTensor(.f32, [-1, 4]) }
        #expect(throws: EPError.invalidArgument(field: "shape[1]", value: "-3", requirement: "must be ≥ 0")) { try HostTensor(.f32, [0, -3]) }
        #expect(throws: EPError.invalidArgument(field: "shape", value: "[\(Int.max), 2]", requirement: "must describe at most \(Int.max) bytes of i32")) {
            try HostTensor(.i32, [Int.max, 2])
        }
        // Elements inside Int whose bytes are not.
        #expect(throws: EPError.invalidArgument(field: "shape", value: "[\(Int.max / 4)]", requirement: "must describe at most \(Int.max) bytes of i64")) {
            try HostTensor(.i64, [Int.max / 4])
        }
        let available = Int(clamping: ProcessInfo.processInfo.physicalMemory)
        let huge = available / 4 + 1   // f32 elements: more bytes than this host has
        #expect(throws: EPError.outOfMemory(buffer: "a HostTensor of f32[\(huge)]", bytes: huge * 4, available: available)) {
            try HostTensor(.f32, [huge])
        }
        // A size of 0 is an empty tensor whatever the others are (their product alone would leave Int).
        let empty = try HostTensor(.f32, [Int.max, 2, 0])
        #expect(try empty.byteCount == 0 && empty.elementCount == 0 && empty.bytes().isEmpty && empty.array(of: Float.self).isEmpty)
        #expect(empty.ref.elementCount == 0)
    }
}

private final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func add() { lock.withLock { count += 1 } }
    var value: Int { lock.withLock { count } }
}

private final class ResultBox: @unchecked Sendable {
    private let lock = NSLock()
    private var result: Result<Void, EPError>?
    func set(_ value: Result<Void, EPError>) { lock.withLock { result = value } }
    func get() throws(EPError) { try lock.withLock { result }!.get() }
}
