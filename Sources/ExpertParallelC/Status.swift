import CExpertParallel
import ExpertParallel

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The status a C caller sees for each `EPError` case.
extension EPError {
    var status: epResult_t {
        switch self {
        // A configuration whose buffers cannot fit is a configuration to change: no status of
        // its own (that would change the ABI); the message says "out of memory: <buffer> needs ...".
        case .invalidConfig, .invalidArgument, .repeatedExpert, .outOfMemory: epInvalidArgument
        case .overflow: epOverflow
        case .wrongOrder: epInvalidUsage
        case .timeout: epTimeout
        case .peerFailed: epPeerFailed
        case .inactiveRank: epInactiveRank
        case .backend: epCudaError
        case let .lowerLayer(failure): failure.status
        }
    }
}

/// The status a C caller sees for a failure below the library: by the library that failed,
/// never by its message.
extension BackendFailure {
    var status: epResult_t {
        switch library {
        case .nccl: epNcclError
        case .driver, .nvrtc, .system: epCudaError
        }
    }
}

/// An error a C caller can be told about: a status and a message.
protocol StatusError: Error {
    var status: epResult_t { get }
    var message: String { get }
    /// The error with its arguments named as the entry point's C structs name them.
    func naming(_ names: CNames) -> any StatusError
}

extension StatusError {
    func naming(_ names: CNames) -> any StatusError { self }
}

extension EPError: StatusError {
    /// The text with the core's values in the header's words (`cValueWording`). A failure below
    /// the library keeps its own text (a compiler's log may hold any word).
    var message: String {
        switch self {
        case .lowerLayer, .backend: description
        default: cValueWording(description)
        }
    }

    func naming(_ names: CNames) -> any StatusError {
        switch self {
        case .repeatedExpert:
            // Its text names the routing ("invalid argument: topkIdx token 1 names expert 3 twice ...", the device's
            // "topkIdx[rank 1] token 1 ..."); its case holds no field.
            return RenamedError(status: status, message: names.renaming(message))
        case let .peerFailed(rank, peer, reason):
            // The reason is the peer's error: its arguments are the peer's (entry `peer` of a collective call's arrays).
            return EPError.peerFailed(rank: rank, peer: peer, reason: names.ofRank(peer).renaming(reason))
        case let .invalidArgument(field, value, requirement):
            // (An overlap's requirement may name the step's routing of a rank, `topkIdx[rank 1]`.)
            return EPError.invalidArgument(field: names.indexingRanks(field), value: value, requirement: names.indexingRanks(requirement))
                .renamingField(names.rankPairs, parts: CNames.tensorParts)
        case let .wrongOrder(text):
            return EPError.wrongOrder(names.renaming(text))
        default:
            return self
        }
    }
}

/// An error whose text names an argument that its `EPError` case holds no field for, renamed.
struct RenamedError: StatusError {
    var status: epResult_t
    var message: String
}

/// An entry point's arguments as its C structs name them where the library's checks name them
/// otherwise: each pair a leading Swift name and its C name (`input.tokens` is epDispatch's
/// `inputs.tokens`, a stacked call's `inputs` its `call.inputTokens`). A renamed tensor's
/// `address`, `location` and `shape` read as the C descriptor's `data`, `device` and `sizes`.
struct CNames {
    var pairs: [(from: String, to: String)]
    /// A collective call's (epGroupUpdateAll, epGroupDispatchAll, epGroupCombineAll, and the
    /// group's status of the routing they gave): rank r's arguments are entry r of the C arrays,
    /// `inputs[r].tokens`, `outputs[r].topkIdx`, `inputs[r].topkIdx`, whether the error names its
    /// rank as a failure of rank r (`RankFailure`, `ofRank(_:)`) or in its field (the GPU's
    /// `topkIdx[rank r]`, `indexingRanks(_:)`), as the call's own descriptor checks name them.
    var collective = false
    /// The rank whose arguments the error names (a collective call's rank failure, a peer's reason).
    var rank: Int? = nil

    /// The names of rank `r`'s arguments.
    func ofRank(_ r: Int) -> CNames {
        var names = self
        names.rank = r
        return names
    }

    /// `pairs`, after a collective call's rank's own names where the rank is known.
    var rankPairs: [(from: String, to: String)] {
        guard collective, let rank else { return pairs }
        return [("input", "inputs[\(rank)]"), ("output", "outputs[\(rank)]"), ("topkIdx", "inputs[\(rank)].topkIdx")] + pairs
    }

    /// `text` with a collective call's arguments that name their rank in an index (the GPU's
    /// `topkIdx[rank 1][0][1]`) as entry r of the C arrays (`inputs[1].topkIdx[0][1]`).
    func indexingRanks(_ text: String) -> String {
        guard collective else { return text }
        return text.replacing(/\b(topkIdx|input|output)\[rank (\d+)\]/) { match in
            EPError.field(String(match.1), renaming: ofRank(Int(match.2)!).rankPairs)
        }
    }

    /// `text` (an error's, such as a peer's reason or a quoted update's error) with each argument's
    /// error in it renamed, and the GPU's reason for a peer's routing (`its topkIdx was invalid`)
    /// naming the routing too. What follows a peer's refusal quoted in it ("rank 0 did nothing
    /// because rank 1 rejected its call: ...", `EPError.peerFailed`'s text) names that peer's arguments.
    func renaming(_ text: String) -> String {
        var renamed = "", rest = Substring(text), names = self
        while let refusal = rest.firstMatch(of: #/rank \d+ did nothing because rank (\d+) rejected its call: /#) {
            renamed += names.renamingOwn(rest[..<refusal.range.upperBound])
            names = ofRank(Int(refusal.1)!)
            rest = rest[refusal.range.upperBound...]
        }
        return renamed + names.renamingOwn(rest)
    }

    private func renamingOwn(_ text: Substring) -> String {
        let routing = EPError.field("topkIdx", renaming: rankPairs)
        return EPError.renamingArguments(in: indexingRanks(String(text)), rankPairs, parts: CNames.tensorParts)
            .replacing(EPError.invalidRoutingReason, with: EPError.invalidRoutingReason.replacing("topkIdx", with: routing))
    }

    /// An update's routing, epUpdateInputs_t's: also where a dispatch or combine quotes the error
    /// of the handle's failed update.
    private static let routing = (from: "topkIdx", to: "inputs.topkIdx")
    static let perRank = CNames(pairs: [("input", "inputs"), ("output", "outputs"), ("inputs", "inputs"), ("outputs", "outputs"), routing])
    static let update = CNames(pairs: [routing])
    static let collective = CNames(pairs: perRank.pairs, collective: true)
    static let tensorParts = [("address", "data"), ("location", "device"), ("shape", "sizes")]
}

/// The error of one rank of a collective call, reported as "rank r: ...".
struct RankFailure: StatusError {
    var rank: Int
    var error: any StatusError
    /// What the error's text cannot know, appended after it (a timeout's length).
    var note: String? = nil
    var status: epResult_t { error.status }
    var message: String { "rank \(rank): \(error.message)" + (note.map { "; \($0)" } ?? "") }

    func naming(_ names: CNames) -> any StatusError {
        var renamed = self
        renamed.error = error.naming(names.ofRank(rank))
        return renamed
    }

    /// The failure of `rank`'s call in a group of `config`: a timeout says how long the wait was.
    init(rank: Int, error: EPError, config: GroupConfig) {
        self.rank = rank
        self.error = error
        if case .timeout = error { note = "the group's timeout is \(config.timeout.seconds) seconds" }
    }
}

/// A call the group does not offer (the per-rank calls on a virtual GPU group).
struct UnsupportedCall: StatusError {
    var message: String
    var status: epResult_t { epInvalidUsage }
}

/// A broken invariant of the C layer: reported as `epInternalError`, never a trap.
struct InternalError: StatusError {
    var message: String
    var status: epResult_t { epInternalError }
}

/// Runs the body of entry point `name` and returns its status. This thread's last-error message
/// is cleared on success and reads "name: what was wrong" on failure. Nothing is thrown across
/// the ABI: any error that is not a `StatusError` becomes `epInternalError`.
/// `names`: how the entry point's C structs name the arguments the library's checks name otherwise.
/// `clearing`: false for the destroy calls, whose success leaves the message as it was: a garbage
/// collector's finalizer runs them at any moment, also between another call's failure and the
/// caller's read of its message, which it must not erase.
func entryPoint(_ name: StaticString, naming names: CNames? = nil, clearing: Bool = true, _ body: () throws -> Void) -> epResult_t {
    do {
        try body()
        if clearing { LastError.clear() }
        return epSuccess
    } catch let error as StatusError {
        let error = names.map { error.naming($0) } ?? error
        LastError.set("\(name): \(cWording(error.message, entry: name))")
        return error.status
    } catch {
        LastError.set("\(name): internal error: \(error)")
        return epInternalError
    }
}

/// `body`'s value, its error named as `names`: for an entry point whose naming depends on the
/// object it is given (`GroupObject.statusNames`), which `entryPoint(_:naming:_:)` reads too late.
func naming<T>(_ names: CNames, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let error as StatusError {
        throw error.naming(names) as any Error
    }
}

/// A message of the core in C's words: a missing pointer is NULL and an automatic size 0 (the
/// core says nil for both); the send-only phase is epPhaseSendOnly; a layout is its epLayout_t, a
/// direction its epPassDirection_t; the calls the message asks for are entry points (complete():
/// epGroupComplete, or epComplete from a rank's own calls, `entry` not an epGroup one).
func cWording(_ message: String, entry: StaticString = "epGroup") -> String {
    let complete = "\(entry)".hasPrefix("epGroup") ? "epGroupComplete" : "epComplete"
    return message.replacing(" = nil;", with: " = NULL;").replacing("must be non-nil", with: "must not be NULL")
        .replacing("must be nil for LL", with: "must be 0 for LL").replacing("must be nil", with: "must be NULL")
        .replacing("(or nil for automatic)", with: "(or 0 for automatic)")
        .replacing("phase .sendOnly", with: "phase epPhaseSendOnly")
        .replacing(/layout expert-major\(alignment (\d+)\)/) { "layout epLayoutExpertMajorPadded (alignment \($0.1))" }
        .replacing("layout expert-major", with: "layout epLayoutExpertMajor").replacing("layout rank-major", with: "layout epLayoutRankMajor")
        .replacing("layout flat", with: "layout epLayoutFlat")
        .replacing("(this call: forward", with: "(this call: epForward").replacing("(this call: backward", with: "(this call: epBackward")
        .replacing(/complete\(\) the pending (.+?) first/) { "call \(complete) for the pending \($0.1) first" }
        .replacing("complete() needs", with: "\(complete) needs")
        .replacing("clean it before calling", with: "clean it (epGroupCleanRanks) before calling")
        .replacing("checkStatus() names it", with: "epGroupCheckStatus names it").replacing("clean() was called", with: "epGroupCleanRanks was called")
}

/// The thread-local message of the last call, as a C string owned by the thread's slot.
enum LastError {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        _ = pthread_key_create(&key) { free($0) }
        return key
    }()

    static func set(_ message: String) {
        free(pthread_getspecific(key))
        _ = pthread_setspecific(key, strdup(message))
    }

    static func clear() {
        guard let old = pthread_getspecific(key) else { return }
        free(old)
        _ = pthread_setspecific(key, nil)
    }

    static var current: UnsafePointer<CChar> {
        guard let message = pthread_getspecific(key) else { return emptyString.pointers[0] }
        return UnsafePointer(message.assumingMemoryBound(to: CChar.self))
    }
}

/// C strings made once and never freed, for the ABI's `const char*` results.
struct StaticCStrings: @unchecked Sendable {
    let pointers: [UnsafePointer<CChar>]
    init(_ strings: [String]) { pointers = strings.map { UnsafePointer(strdup($0)!) } }
}

private let emptyString = StaticCStrings([""])

/// One string per status, in the order of `epResult_t`; the last one for unknown values.
private let statusStrings = StaticCStrings([
    "epSuccess: no error",
    "epInvalidArgument: a pointer, struct size, enum value, configuration field, tensor or routing entry is invalid",
    "epInvalidUsage: a call out of order, or one this group does not offer",
    "epOverflow: more rows would reach a rank than its receive buffer holds",
    "epTimeout: a rank waited past the timeout for another; the late ranks are masked inactive",
    "epPeerFailed: another rank rejected its call, so this rank did nothing",
    "epInactiveRank: the rank is masked inactive; clean it first",
    "epCudaError: a CUDA driver or NVRTC call failed",
    "epNcclError: an NCCL call failed, or NCCL could not be loaded",
    "epInternalError: a failure inside the library",
    "unknown epResult_t value",
])

@_cdecl("epGetErrorString")
public func cGetErrorString(_ result: epResult_t) -> UnsafePointer<CChar> {
    let strings = statusStrings.pointers
    return strings[min(Int(result.rawValue), strings.count - 1)]
}

@_cdecl("epGetLastErrorMessage")
public func cGetLastErrorMessage() -> UnsafePointer<CChar> { LastError.current }

@_cdecl("epGetAbiVersion")
public func cGetAbiVersion(_ version: UnsafeMutablePointer<Int32>?) -> epResult_t {
    entryPoint("epGetAbiVersion") {
        let version = try required(version, "version")
        version.pointee = Int32(EP_ABI_VERSION)
    }
}
