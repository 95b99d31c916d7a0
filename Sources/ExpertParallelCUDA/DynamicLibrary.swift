#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A shared library opened with `dlopen` and kept open for the life of the process
/// (function tables hold pointers into it, so it is never closed).
package struct DynamicLibrary: @unchecked Sendable {
    package let name: String
    /// Where it was found: the path or soname that `dlopen` accepted.
    package let location: String
    private let handle: UnsafeMutableRawPointer

    /// Opens the first candidate that `dlopen` accepts. Each candidate is a path or a soname.
    /// On failure the error lists every candidate with `dlerror`'s reason.
    /// `prepare` runs before each candidate is tried (to preload its companions).
    package static func open(
        _ name: String, candidates: [String], prepare: (String) -> Void = { _ in }
    ) throws -> DynamicLibrary {
        var attempts: [String] = []
        for candidate in candidates {
            prepare(candidate)
            if let handle = dlopen(candidate, RTLD_NOW | RTLD_LOCAL) {
                return DynamicLibrary(name: name, location: candidate, handle: handle)
            }
            var reason = lastDynamicLinkerError()
            if reason.hasPrefix(candidate + ": ") { reason.removeFirst(candidate.count + 2) }
            attempts.append("\(candidate): \(reason)")
        }
        throw CUDAError.libraryUnavailable(library: name, attempts: attempts)
    }

    /// Loads a library by path and keeps it loaded; false when it cannot be opened.
    @discardableResult
    package static func preload(_ path: String) -> Bool {
        dlopen(path, RTLD_NOW | RTLD_LOCAL) != nil
    }

    /// The address of the first of `names` that the library exports, typed as `T`
    /// (a `@convention(c)` function type whose signature matches the C declaration).
    package func function<T>(_ names: String..., as type: T.Type = T.self) throws -> T {
        precondition(MemoryLayout<T>.size == MemoryLayout<UnsafeRawPointer>.size, "\(T.self) is not a C function pointer")
        for name in names {
            if let address = dlsym(handle, name) { return unsafeBitCast(address, to: T.self) }
        }
        throw CUDAError.symbolMissing(library: self.name, symbol: names.joined(separator: " or "))
    }

    /// Like `function`, but nil when the library lacks every name (optional features).
    package func optionalFunction<T>(_ names: String..., as type: T.Type = T.self) -> T? {
        for name in names {
            if let address = dlsym(handle, name) { return unsafeBitCast(address, to: T.self) }
        }
        return nil
    }
}

private func lastDynamicLinkerError() -> String {
    guard let message = dlerror() else { return "not found" }
    return String(cString: message)
}

/// Runs a library loader once and keeps its outcome, so a missing library is reported the
/// same way on every call instead of being searched for again.
func loadOnce<Library>(_ load: () throws -> Library) -> Result<Library, CUDAError> {
    do {
        return .success(try load())
    } catch let error as CUDAError {
        return .failure(error)
    } catch {
        return .failure(.libraryUnavailable(library: "\(Library.self)", attempts: ["\(error)"]))
    }
}
