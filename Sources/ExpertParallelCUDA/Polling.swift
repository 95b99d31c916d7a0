#if canImport(Glibc)
import Glibc
#endif

/// Calls `done` every `interval` until it returns true (then true), or until `timeout` has
/// passed without it (then false): the host side of every bounded wait for other ranks.
///
/// Any durations are safe: a sleep lasts at most `interval`, at most what is left of `timeout`,
/// and at most one `usleep` slice (1 µs ... 999,999 µs), so an `interval` of hours is polled about
/// once a second instead of overflowing `usleep`'s 32-bit microseconds, and the time passed is
/// compared with `timeout` (never added to the clock's now), so a `timeout` too large for any
/// deadline simply never passes. A zero or negative `timeout` returns false after one `done`.
public func poll(every interval: Duration, for timeout: Duration, until done: () throws -> Bool) rethrows -> Bool {
    let clock = ContinuousClock()
    let start = clock.now
    while try !done() {
        let elapsed = clock.now - start   // ≥ 0 and small: never near Duration's bounds
        if elapsed >= timeout { return false }
        usleep(pollSlice(min(interval, timeout - elapsed)))   // timeout > elapsed ≥ 0: no overflow
    }
    return true
}

/// `duration` in whole microseconds, clamped to 1 ... 999,999 (the range `usleep` is specified for).
/// Compared as durations first: `components` of one past Int64.max seconds would not fit.
package func pollSlice(_ duration: Duration) -> useconds_t {
    if duration >= .microseconds(999_999) { return 999_999 }
    if duration <= .microseconds(1) { return 1 }
    return useconds_t(duration.components.attoseconds / 1_000_000_000_000)   // under a second here
}
