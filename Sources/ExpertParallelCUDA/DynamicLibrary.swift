#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A shared library opened with `dlopen` and kept open for the life of the process
/// (function tables hold pointers into it, so it is never closed), or a table of symbols
/// standing in for one (`init(name:location:symbols:)`).
package struct DynamicLibrary: @unchecked Sendable {
    package let name: String
    /// Where it was found: the path or soname that `dlopen` accepted.
    package let location: String
    private let source: Source

    private enum Source {
        case opened(UnsafeMutableRawPointer)
        case table([String: UnsafeRawPointer])
    }

    private init(name: String, location: String, handle: UnsafeMutableRawPointer) {
        self.name = name
        self.location = location
        source = .opened(handle)
    }

    /// A library whose symbols are the given C function pointers (`@convention(c)` closures cast
    /// with `unsafeBitCast(_:to: UnsafeRawPointer.self)`), each of the type its C declaration
    /// has. For tests only: the CUDA layer's tables (`DriverLibrary(library:)`,
    /// `NVRTCLibrary(library:)`, `NCCLLibrary(library:)`) resolve from it as from `dlopen`,
    /// so a mock driver can fail any call with a chosen code, with no GPU (as swift-system
    /// mocks its system calls). A name the table lacks is a missing symbol.
    package init(name: String, location: String = "mock", symbols: [String: UnsafeRawPointer]) {
        self.name = name
        self.location = location
        source = .table(symbols)
    }

    private func address(_ symbol: String) -> UnsafeRawPointer? {
        switch source {
        case .opened(let handle): dlsym(handle, symbol).map { UnsafeRawPointer($0) }
        case .table(let symbols): symbols[symbol]
        }
    }

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
            if let address = address(name) { return unsafeBitCast(address, to: T.self) }
        }
        throw CUDAError.symbolMissing(library: self.name, symbol: names.joined(separator: " or "))
    }

    /// Like `function`, but nil when the library lacks every name (optional features).
    package func optionalFunction<T>(_ names: String..., as type: T.Type = T.self) -> T? {
        for name in names {
            if let address = address(name) { return unsafeBitCast(address, to: T.self) }
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
