#if canImport(Glibc)
import Glibc
#endif

/// Calls `done` every `interval` until it returns true (then true), or until `timeout` has
/// passed without it (then false): the host side of every bounded wait for other ranks.
public func poll(every interval: Duration, for timeout: Duration, until done: () throws -> Bool) rethrows -> Bool {
    let clock = ContinuousClock()
    let deadline = clock.now + timeout
    let pause = useconds_t(max(1, interval / .microseconds(1)))
    while try !done() {
        if clock.now >= deadline { return false }
        usleep(pause)
    }
    return true
}
