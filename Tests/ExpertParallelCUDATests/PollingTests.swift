import ExpertParallelCUDA
import Foundation
import Testing

/// `poll(every:for:until:)` took `interval` in microseconds as a UInt32 (an interval over ~71
/// minutes trapped) and added `timeout` to the clock's now (an enormous timeout could trap). Any
/// durations are safe now: each sleep is one bounded slice, and the time passed is compared with
/// `timeout`, never added to now.
@Suite("poll's durations")
struct PollingTests {
    /// A `done` that returns true on its `n`-th call, counting its calls.
    final class TrueOnCall: @unchecked Sendable {
        let n: Int
        private(set) var calls = 0
        init(_ n: Int) { self.n = n }
        func callAsFunction() -> Bool { calls += 1; return calls >= n }
    }

    @Test("an interval of hours (past usleep's 32-bit microseconds) neither traps nor sleeps it: each slice is under a second")
    func hugeInterval() {
        let done = TrueOnCall(2)
        let start = ContinuousClock.now
        #expect(poll(every: .seconds(5000), for: .seconds(60)) { done() })
        #expect(done.calls == 2)
        #expect(ContinuousClock.now - start < .seconds(3), "one slice of at most 999,999 µs, not 5000 s")
    }

    @Test("a timeout too large to add to now is a deadline never reached, not a trap", arguments: [
        Duration.seconds(Int64.max), Duration(secondsComponent: Int64.max, attosecondsComponent: 999_999_999_999_999_999),
        Duration(attoseconds: Int128.max),
    ])
    func hugeTimeout(_ timeout: Duration) {
        let done = TrueOnCall(3)
        let start = ContinuousClock.now
        #expect(poll(every: .milliseconds(1), for: timeout) { done() })
        #expect(done.calls == 3)
        #expect(ContinuousClock.now - start < .seconds(3))
    }

    @Test("both huge: the slice is bounded and the deadline never reached")
    func hugeIntervalAndTimeout() {
        let done = TrueOnCall(2)
        let start = ContinuousClock.now
        #expect(poll(every: Duration(attoseconds: Int128.max), for: Duration(attoseconds: Int128.max)) { done() })
        #expect(ContinuousClock.now - start < .seconds(3))
    }

    @Test("the timeout still passes: false once it has, after sleeping no longer than what was left of it")
    func timeoutPasses() {
        let done = TrueOnCall(.max)
        let start = ContinuousClock.now
        #expect(!poll(every: .seconds(5000), for: .milliseconds(50)) { done() })
        let took = ContinuousClock.now - start
        #expect(took >= .milliseconds(50) && took < .seconds(3), "\(took)")
        #expect(done.calls >= 2, "called again at the deadline")
    }

    @Test("a zero, negative or most negative timeout returns false after one call; a zero or negative interval still sleeps a microsecond",
          arguments: [Duration.zero, .seconds(-1), Duration(attoseconds: Int128.min)])
    func nonPositiveTimeout(_ timeout: Duration) {
        let done = TrueOnCall(.max)
        #expect(!poll(every: .zero, for: timeout) { done() })
        #expect(done.calls == 1)
        let soon = TrueOnCall(3)
        #expect(poll(every: Duration(attoseconds: Int128.min), for: .seconds(10)) { soon() })
        #expect(soon.calls == 3)
    }

    @Test("a done that throws ends the wait with its error")
    func throwingDone() {
        struct Stop: Error {}
        #expect(throws: Stop.self) { try poll(every: .seconds(5000), for: .seconds(Int64.max)) { throw Stop() } }
    }
}

@Suite("poll's sleep slice")
struct PollSliceTests {
    @Test("whole microseconds, clamped to 1 ... 999,999, for any duration", arguments: [
        (Duration.microseconds(5), 5), (.nanoseconds(1500), 1), (.nanoseconds(999), 1), (.zero, 1), (.seconds(-3), 1),
        (Duration(attoseconds: Int128.min), 1), (.microseconds(999_998), 999_998), (.seconds(1), 999_999),
        (.seconds(5000), 999_999), (.seconds(Int64.max), 999_999), (Duration(attoseconds: Int128.max), 999_999),
    ])
    func slices(_ duration: Duration, _ microseconds: Int) {
        #expect(Int(pollSlice(duration)) == microseconds)
    }
}
