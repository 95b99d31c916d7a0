import Foundation

/// Every error the library reports. Each case names what was wrong, the value, and the bound.
public enum EPError: Error, Sendable, Equatable, CustomStringConvertible {
    /// A configuration field is out of bounds.
    case invalidConfig(field: String, value: String, requirement: String)
    /// A call argument (tensor, shape, routing entry) is out of bounds.
    case invalidArgument(field: String, value: String, requirement: String)
    /// One token's routing row names the same expert twice; `rank`: whose routing, where the
    /// error comes from a call of several ranks' routing (the device's status), else nil.
    case repeatedExpert(token: Int, firstColumn: Int, secondColumn: Int, expert: Int, rank: Int? = nil)
    /// More rows would reach `rank` than its receive buffer holds (overflow policy `.fail`).
    case overflow(rank: Int, required: Int, capacity: Int)
    /// A call came out of order, such as dispatch before the handle's first update.
    case wrongOrder(String)
    /// `rank` waited longer than the timeout for `missing`; those ranks are now masked inactive.
    case timeout(rank: Int, missing: [Int])
    /// Another rank of the same step rejected its call, so this rank did nothing either.
    case peerFailed(rank: Int, peer: Int, reason: String)
    /// The calling rank is masked inactive; clean it first.
    case inactiveRank(Int)
    /// A buffer the configuration or call needs (`buffer` names it and what it holds) would take
    /// `bytes`, more than `available` (the memory of this host, or of the device); found before
    /// anything was allocated for it.
    case outOfMemory(buffer: String, bytes: Int, available: Int)
    /// A failure below the library that no library call reported (an unknown device status, a
    /// check of the backend's own); failures of the CUDA driver, NVRTC or NCCL are `lowerLayer`.
    case backend(String)
    /// A call into a library below this one (the CUDA driver, NVRTC, NCCL) failed, or the
    /// library could not be loaded. Reads like `cuModuleLoadData failed: CUDA_ERROR_INVALID_PTX (218)`.
    case lowerLayer(BackendFailure)

    public var description: String {
        switch self {
        case let .invalidConfig(field, value, requirement):
            "invalid configuration: \(field) = \(value); \(requirement)"
        case let .invalidArgument(field, value, requirement):
            "invalid argument: \(field) = \(value); \(requirement)"
        case let .repeatedExpert(token, first, second, expert, rank):
            "invalid argument: topkIdx\(rank.map { "[rank \($0)]" } ?? "") token \(token) names expert \(expert) twice (columns \(first) and \(second)); each expert may appear once per token"
        case let .overflow(rank, required, capacity):
            "overflow: rank \(rank) would receive \(required) rows but maxReceivedTokensPerRank is \(capacity)"
        case let .wrongOrder(message):
            "call out of order: \(message)"
        case let .timeout(rank, missing):
            "timeout: rank \(rank) waited past the timeout for rank(s) \(missing), now masked inactive"
        case let .peerFailed(rank, peer, reason):
            "rank \(rank) did nothing because rank \(peer) rejected its call: \(reason)"
        case let .inactiveRank(rank):
            "rank \(rank) is masked inactive; clean it before calling"
        case let .outOfMemory(buffer, bytes, available):
            "out of memory: \(buffer) needs \(Self.describe(bytes: bytes)), more than the \(Self.describe(bytes: available)) available"
        case let .backend(message):
            message
        case let .lowerLayer(failure):
            failure.description
        }
    }

    /// The same error with the argument named otherwise (also where it is the reason a peer gave
    /// for rejecting its call, or the error of a failed update that a later call quotes); any
    /// other error as it is. See `field(_:renaming:parts:)`. A layer that takes its arguments
    /// under other names (the C structs' fields) names them its own way.
    package func renamingField(_ names: [(from: String, to: String)], parts: [(from: String, to: String)] = []) -> EPError {
        switch self {
        case let .invalidArgument(field, value, requirement):
            return .invalidArgument(field: Self.field(field, renaming: names, parts: parts), value: value,
                                    requirement: Self.renamingOverlap(requirement, names, parts: parts))
        case let .peerFailed(rank, peer, reason):
            return .peerFailed(rank: rank, peer: peer, reason: Self.renamingArguments(in: reason, names, parts: parts))
        case let .wrongOrder(message):
            return .wrongOrder(Self.renamingArguments(in: message, names, parts: parts))
        default:
            return self
        }
    }

    /// `text` with each argument's error in it, as its description reads ("invalid argument:
    /// <field> = ...", a repeated expert's "invalid argument: topkIdx token ..."), naming its field
    /// as `field(_:renaming:parts:)` renames it; the rest as it is.
    package static func renamingArguments(in text: String, _ names: [(from: String, to: String)], parts: [(from: String, to: String)] = []) -> String {
        let prefix = "invalid argument: "
        let pieces = text.split(separator: prefix, omittingEmptySubsequences: false)
        return pieces.dropFirst().reduce(String(pieces[0])) {
            $0 + prefix + renamingOverlap(field(String($1), renaming: names, parts: parts), names, parts: parts)
        }
    }

    /// `field` with its leading name (the whole field, or the part before a ".", "[" or " ")
    /// replaced by the `to` of the first of `names` whose `from` it is, and in what follows, each
    /// part (after a ".", before a ".", "[" or " ") that is the `from` of one of `parts` replaced
    /// by its `to`; indices (`[1]`, `[rank 1]`) stay as they are. Unchanged where no name is.
    package static func field(_ field: String, renaming names: [(from: String, to: String)], parts: [(from: String, to: String)] = []) -> String {
        func follows(_ from: String) -> Bool {
            guard field.hasPrefix(from) else { return false }
            let next = field.dropFirst(from.count).first
            return next == nil || next == "." || next == "[" || next == " "
        }
        guard let (from, to) = names.first(where: { follows($0.from) }) else { return field }
        var renamed = to
        var rest = field.dropFirst(from.count)   // "", ".dtype", "[1].tokens.address", ".shape[0] (tokens)", ...
        while let first = rest.first {
            if first == "[", let close = rest.firstIndex(of: "]") {
                renamed += rest[...close]
                rest = rest[rest.index(after: close)...]
            } else if first == "." {
                let part = rest.dropFirst().prefix { ![".", "[", " "].contains($0) }
                renamed += "." + (parts.first { $0.from == part }?.to ?? String(part))
                rest = rest.dropFirst(part.count + 1)
            } else {
                break
            }
        }
        return renamed + rest
    }

    /// The reason a rank gives for its peer's routing that the device found invalid (the peer
    /// reports the error itself, `checkStatus()`).
    package static let invalidRoutingReason = "its topkIdx was invalid"

    /// A data call (update, dispatch, combine) while the send-only `call` ("dispatch" or
    /// "combine") waits for `complete()` (every backend's words).
    package static func sendOnlyOpen(_ call: String) -> EPError { .wrongOrder("complete() the pending send-only \(call) first") }

    /// `complete()` with no send-only dispatch or combine open (every backend's words).
    package static let nothingToComplete = EPError.wrongOrder("complete() needs a dispatch or combine issued with phase .sendOnly")

    /// "N bytes (x.y GiB)": the exact count, and a readable one from KiB up.
    static func describe(bytes: Int) -> String {
        var size = Double(bytes), unit = ""
        for prefix in ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"] where size >= 1024 {
            size /= 1024
            unit = prefix
        }
        let rounded = (size * 10).rounded() / 10
        return unit.isEmpty ? "\(bytes) bytes" : "\(bytes) bytes (\(rounded) \(unit))"
    }
}

/// A failure in a library below this one, described without depending on the layer that
/// talks to it (the core module cannot import the CUDA layer): which library, which call, the
/// code it returned and that code's name.
///
/// Its `description` is the CUDA layer's own text: `cuModuleLoadData failed:
/// CUDA_ERROR_INVALID_PTX (218)`, a compiler log on the lines after an NVRTC failure, and for a
/// library that could not be loaded every place that was tried.
public struct BackendFailure: Sendable, Equatable, CustomStringConvertible {
    /// The library that failed.
    public enum Library: String, Sendable, Equatable, CaseIterable {
        /// The CUDA driver (`libcuda`), and the operating-system calls made on its behalf.
        case driver
        /// NVRTC, CUDA's runtime compiler (`libnvrtc`).
        case nvrtc
        /// NCCL (`libnccl`).
        case nccl
        /// A shared library this package does not know by name.
        case system
    }

    /// How it failed.
    public enum Kind: String, Sendable, Equatable, CaseIterable {
        /// `call` returned `code`, whose name is `name`; `detail` holds a compiler log, if any.
        case callFailed
        /// The shared library `name` could not be opened; `detail` lists the places tried, one a
        /// line; `call` is `dlopen`.
        case libraryUnavailable
        /// The shared library `name` has no symbol `call` (the library is too old).
        case symbolMissing
    }

    public var library: Library
    public var kind: Kind
    /// The call that failed (`cuModuleLoadData`); for a missing symbol the symbol looked for.
    public var call: String
    /// The code the call returned; nil when the library or symbol is missing.
    public var code: Int32?
    /// The code's name (`CUDA_ERROR_INVALID_PTX`); for a missing library or symbol the library's
    /// file name (`libnccl.so.2`).
    public var name: String
    /// An NVRTC program log, or the places a missing library was looked for (one a line).
    public var detail: String

    public init(library: Library, kind: Kind = .callFailed, call: String, code: Int32?, name: String, detail: String = "") {
        self.library = library
        self.kind = kind
        self.call = call
        self.code = code
        self.name = name
        self.detail = detail
    }

    /// `call` returned `code` (named `name`); `detail` is a log printed on the lines after.
    public static func callFailed(_ library: Library, call: String, code: Int32?, name: String, detail: String = "") -> BackendFailure {
        BackendFailure(library: library, kind: .callFailed, call: call, code: code, name: name, detail: detail)
    }

    /// The shared library `file` could not be opened from any of `attempts`.
    public static func libraryUnavailable(_ library: Library, file: String, attempts: [String]) -> BackendFailure {
        BackendFailure(library: library, kind: .libraryUnavailable, call: "dlopen", code: nil, name: file,
                       detail: attempts.joined(separator: "\n"))
    }

    /// The shared library `file` opened but has no symbol `symbol`.
    public static func symbolMissing(_ library: Library, file: String, symbol: String) -> BackendFailure {
        BackendFailure(library: library, kind: .symbolMissing, call: symbol, code: nil, name: file)
    }

    /// The places a missing library was looked for (empty for other kinds).
    public var attempts: [String] {
        guard kind == .libraryUnavailable, !detail.isEmpty else { return [] }
        return detail.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    }

    public var description: String {
        switch kind {
        case .callFailed:
            let code = code.map { " (\($0))" } ?? ""
            let log = Self.trimmingTrailingWhitespace(detail)
            return "\(call) failed: \(name)\(code)" + (log.isEmpty ? "" : "\n\(log)")
        case .libraryUnavailable:
            let tried = attempts.isEmpty ? "" : "\n  tried:\n" + attempts.map { "    \($0)" }.joined(separator: "\n")
            return "\(name) is not available\(tried)"
        case .symbolMissing:
            return "\(name) has no symbol \(call) (is the library too old?)"
        }
    }

    /// `text` without trailing whitespace and NULs (an NVRTC log ends in both).
    private static func trimmingTrailingWhitespace(_ text: String) -> String {
        var text = Substring(text)
        while let last = text.last, last.isWhitespace || last == "\0" { text.removeLast() }
        return String(text)
    }
}

/// `error.localizedDescription` reads as `description` (Foundation's default would be "The
/// operation could not be completed", losing the field, the value and the bound).
extension EPError: LocalizedError {
    public var errorDescription: String? { description }
}
