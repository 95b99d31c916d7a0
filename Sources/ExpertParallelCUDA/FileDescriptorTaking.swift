import CExpertParallelShim
#if canImport(Glibc)
import Glibc
#endif

/// Taking another process's file descriptor (Linux `pidfd_getfd`): how a rank receives the
/// POSIX descriptor of a peer's exported allocation without a socket of its own. Every rank
/// calls `allowTaking()` before it shares its descriptors' numbers, and `forbidTaking()` once
/// every peer has taken them. The ranks must share a PID namespace (one host, one container).
public enum FileDescriptorTaking {
    /// Lets other processes of this user take descriptors from this one where Yama restricts
    /// ptrace to descendants (`prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)`).
    public static func allowTaking() throws {
        let result = ep_shim_allow_fd_taking()
        if result != 0 { throw CUDAError.driver(call: "prctl(PR_SET_PTRACER)", code: -result, name: "errno \(-result)") }
    }

    /// Ends `allowTaking()` once the peers have taken what they needed.
    public static func forbidTaking() {
        _ = ep_shim_forbid_fd_taking()
    }

    /// A duplicate in this process of descriptor `descriptor` of process `process`; close it with `close`.
    public static func take(_ descriptor: Int32, from process: Int32) throws -> Int32 {
        let result = ep_shim_take_fd(process, descriptor)
        if result < 0 {
            let reason = -result == 1 ? "EPERM: not allowed to take it (ptrace policy or seccomp)" : "errno \(-result)"
            throw CUDAError.driver(call: "pidfd_getfd(process \(process), descriptor \(descriptor))", code: -result, name: reason)
        }
        return result
    }

    public static func close(_ descriptor: Int32) { ep_shim_close_fd(descriptor) }

    /// This process's id.
    public static var processID: Int32 { Int32(getpid()) }
}
