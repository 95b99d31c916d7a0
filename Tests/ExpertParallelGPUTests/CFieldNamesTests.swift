import CExpertParallel
import ExpertParallel
@testable import ExpertParallelC
@testable import ExpertParallelGPU
import Testing

/// The C entry points name the arguments as their parameters and structs do: the library's checks
/// name the Swift calls' fields (`input.tokens.shape`, a stacked call's `inputs.address`), and each
/// entry point renames them (`CNames`) before the message is set.
struct CFieldNamesTests {
    static func named(_ field: String, _ names: CNames) -> String {
        guard case let .invalidArgument(renamed, _, _) = EPError.invalidArgument(field: field, value: "v", requirement: "r").naming(names) as? EPError
        else { return "(not an EPError)" }
        return renamed
    }

    @Test(arguments: [
        // The per-rank calls: their parameters are inputs and outputs, the descriptor's fields data, device, sizes.
        ("input.tokens.shape", "inputs.tokens.sizes"), ("output.topkIdx.location", "outputs.topkIdx.device"),
        ("input.topkWeights", "inputs.topkWeights"), ("input.tokens.address", "inputs.tokens.data"),
        ("inputs[1].tokens.address", "inputs[1].tokens.data"), ("outputs[0].tokens.strides", "outputs[0].tokens.strides"),
        ("inputs", "inputs"), ("rank", "rank"), ("inputsX.tokens", "inputsX.tokens"), ("config.direction", "config.direction"),
    ])
    func perRankCallsNameInputsAndOutputs(_ field: String, _ expected: String) {
        #expect(Self.named(field, .perRank) == expected)
    }

    @Test(arguments: [
        ("topkIdx.shape[0] (tokens)", "inputs.topkIdx.sizes[0] (tokens)"), ("topkIdx[rank 1].location", "inputs.topkIdx[rank 1].device"),
        ("topkIdx[0][1]", "inputs.topkIdx[0][1]"), ("topkIdx", "inputs.topkIdx"), ("handle", "handle"),
    ])
    func updatesNameTheirInputs(_ field: String, _ expected: String) {
        #expect(Self.named(field, .update) == expected)
    }

    @Test(arguments: [
        ("inputs.rankStride", "call.inputTokens.rankStride"), ("received.address", "call.receivedTokens.data"),
        ("receivedTopkIdx.location", "call.receivedTopkIdx.device"), ("tokens", "call.tokens"),
        ("topkIdx[rank 2][3][1]", "call.topkIdx[rank 2][3][1]"), ("call.receivedTokens.device", "call.receivedTokens.device"),
        ("expertSourceCounts.dtype", "call.expertSourceCounts.dtype"), ("rank", "rank"),
    ])
    func stackedDispatchesNameTheCallsFields(_ field: String, _ expected: String) {
        #expect(Self.named(field, CheckedStackedDispatch.Field.cNames) == expected)
    }

    @Test func stackedCombinesNameTheCallsFields() {
        #expect(Self.named("combined.address", CheckedStackedCombine.Field.cNames) == "call.combinedTokens.data")
        #expect(Self.named("topkWeights.dtype", CheckedStackedCombine.Field.cNames) == "call.topkWeights.dtype")
    }

    /// A peer's reason (its error's text) and a collective call's rank failure are renamed too;
    /// what is not an argument's error stays as it is.
    @Test func reasonsAndRankFailuresAreRenamed() {
        let peer = EPError.peerFailed(rank: 0, peer: 1, reason: "invalid argument: input.tokens.shape = [3, 9]; must be [3, 8]")
        #expect(peer.naming(.perRank).message == "rank 0 did nothing because rank 1 rejected its call: invalid argument: inputs.tokens.sizes = [3, 9]; must be [3, 8]")
        let other = EPError.peerFailed(rank: 0, peer: 1, reason: "its inputs[1].topkIdx was not read")
        #expect(other.naming(.perRank).message == other.message)
        let failure = RankFailure(rank: 2, error: .invalidArgument(field: "output.tokens.shape", value: "[1]", requirement: "must be [2]"),
                                  config: GroupConfig(algorithm: .lowLatency, ranks: 4, experts: 8, topK: 2, hidden: 8, maxTokensPerRank: 2))
        #expect(failure.naming(.perRank).message == "rank 2: invalid argument: outputs.tokens.sizes = [1]; must be [2]")
        #expect(EPError.overflow(rank: 1, required: 5, capacity: 4).naming(.perRank).message == EPError.overflow(rank: 1, required: 5, capacity: 4).message)
    }

    /// A repeated expert's text names the routing, which its case holds no field for: each entry
    /// point names it as its struct does (as the routing's other errors), also in a peer's reason
    /// and a rank's failure.
    @Test func repeatedExpertsNameTheRoutingsField() throws {
        let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, maxTokensPerRank: 2)
        var twice: EPError?
        do { _ = try RoutingTable(experts: [0, 1, 3, 3], tokens: 2, config: config) } catch { twice = error }
        let error = try #require(twice)
        let text = "names expert 3 twice (columns 0 and 1); each expert may appear once per token"
        #expect(error.naming(.update).message == "invalid argument: inputs.topkIdx token 1 \(text)")
        #expect(error.naming(.update).status == epInvalidArgument)
        #expect(error.naming(CheckedStackedDispatch.Field.cNames).message == "invalid argument: call.topkIdx token 1 \(text)")
        let peer = EPError.peerFailed(rank: 0, peer: 1, reason: error.description)
        #expect(peer.naming(.update).message == "rank 0 did nothing because rank 1 rejected its call: invalid argument: inputs.topkIdx token 1 \(text)")
        #expect(RankFailure(rank: 1, error: error, config: config).naming(.update).message == "rank 1: invalid argument: inputs.topkIdx token 1 \(text)")
    }

    /// A dispatch or combine after a failed update quotes the update's error (a host handle's):
    /// its routing is named as the update's struct names it, the stacked calls' as theirs.
    @Test func aQuotedUpdateErrorNamesTheRoutingsField() {
        let update = EPError.peerFailed(rank: 0, peer: 1, reason: "\(EPError.invalidArgument(field: "topkIdx.shape", value: "[2, 3]", requirement: "must be [tokens, topK = 2]"))")
        let quoted = EPError.wrongOrder("the last update of this handle failed (\(update)); update again before dispatch or combine")
        let reason = "rank 0 did nothing because rank 1 rejected its call: invalid argument: inputs.topkIdx.sizes = [2, 3]; must be [tokens, topK = 2]"
        #expect(quoted.naming(.perRank).message == "call out of order: the last update of this handle failed (\(reason)); update again before dispatch or combine")
        #expect(quoted.naming(CheckedStackedDispatch.Field.cNames).message.contains("invalid argument: call.topkIdx.sizes = [2, 3]"))
        #expect(EPError.wrongOrder("combine needs a dispatch first").naming(.perRank).message == "call out of order: combine needs a dispatch first")
    }

    /// A collective call's rank r gave entry r of the C arrays: its errors name it so, whether the
    /// core names the rank's call (`input.tokens`, in a "rank r: " failure), the call's own
    /// descriptor checks (`outputs[0].tokens`) or the GPU its field (`topkIdx[rank 1]`); a peer's
    /// reason names the peer's entry, also where a later call quotes a failed update's error.
    @Test func collectiveCallsIndexTheirArrays() {
        let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, maxTokensPerRank: 2)
        let dtype = RankFailure(rank: 0, error: .invalidArgument(field: "input.tokens.dtype", value: "f32", requirement: "must be bf16"), config: config)
        #expect(dtype.naming(.collective).message == "rank 0: invalid argument: inputs[0].tokens.dtype = epFloat32; must be epBFloat16")
        let output = RankFailure(rank: 1, error: .invalidArgument(field: "output.tokens.shape", value: "[1]", requirement: "must be [2]"), config: config)
        #expect(output.naming(.collective).message == "rank 1: invalid argument: outputs[1].tokens.sizes = [1]; must be [2]")
        #expect(Self.named("outputs[0].tokens.strides", .collective) == "outputs[0].tokens.strides")
        #expect(Self.named("topkIdx[rank 1].shape", .collective) == "inputs[1].topkIdx.sizes")
        let routing = RankFailure(rank: 1, error: .invalidArgument(field: "topkIdx[0][1]", value: "9", requirement: "must be -1 or in [0, 4)"), config: config)
        #expect(routing.naming(.collective).message == "rank 1: invalid argument: inputs[1].topkIdx[0][1] = 9; must be -1 or in [0, 4)")
        let twice = RankFailure(rank: 1, error: .repeatedExpert(token: 0, firstColumn: 0, secondColumn: 1, expert: 3), config: config)
        #expect(twice.naming(.collective).message.hasPrefix("rank 1: invalid argument: inputs[1].topkIdx token 0 names expert 3 twice"))
        let reason = "\(EPError.invalidArgument(field: "topkIdx[0][1]", value: "9", requirement: "r"))"
        let peer = RankFailure(rank: 0, error: .peerFailed(rank: 0, peer: 1, reason: reason), config: config)
        #expect(peer.naming(.collective).message == "rank 0: rank 0 did nothing because rank 1 rejected its call: invalid argument: inputs[1].topkIdx[0][1] = 9; r")
        let quoted = EPError.wrongOrder("the last update of this handle failed (\(EPError.peerFailed(rank: 0, peer: 1, reason: reason))); update again")
        #expect(RankFailure(rank: 0, error: quoted, config: config).naming(.collective).message
            == "rank 0: call out of order: the last update of this handle failed (rank 0 did nothing because rank 1 rejected its call: invalid argument: inputs[1].topkIdx[0][1] = 9; r); update again")
    }

    /// The device's routing errors (epGroupCheckStatus, and the calls that read layouts) name the
    /// routing as the caller gave it: a virtual GPU group's through epGroupUpdateAll's arrays
    /// (`inputs[1].topkIdx`), an NCCL rank's through epHandleUpdate's struct; also where a rank
    /// reports that its peer's routing was invalid.
    @Test func theDevicesStatusNamesTheCallersRouting() throws {
        let config = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 8, topK: 2, hidden: 8, maxTokensPerRank: 2)
        let range = try #require(DeviceStatus.error([DeviceStatus.indexRange.rawValue, 0, 1, 9], rank: 1, config: config))
        #expect(range.naming(.collective).message == "invalid argument: inputs[1].topkIdx[0][1] = 9; must be -1 or in [0, 8)")
        #expect(range.naming(.update).message == "invalid argument: inputs.topkIdx[rank 1][0][1] = 9; must be -1 or in [0, 8)")
        let peer = try #require(DeviceStatus.error([DeviceStatus.peerFailed.rawValue, 1, 0, 0], rank: 0, config: config))
        #expect(peer.naming(.collective).message == "rank 0 did nothing because rank 1 rejected its call: its inputs[1].topkIdx was invalid")
        #expect(peer.naming(.update).message == "rank 0 did nothing because rank 1 rejected its call: its inputs.topkIdx was invalid")
        #expect(peer.message == "rank 0 did nothing because rank 1 rejected its call: its topkIdx was invalid")
        // The C entry points' choice by group.
        let host = GroupObject(config: config, backend: try HostBackend(try HostGroup(config)))
        #expect(host.statusNames.collective)
        var thrown: String?
        do { try naming(host.statusNames) { throw range } } catch let error as StatusError { thrown = error.message } catch {}
        #expect(thrown == "invalid argument: inputs[1].topkIdx[0][1] = 9; must be -1 or in [0, 8)")
    }

    /// The core's checks name element types, FP8 modes and places in Swift's words (`f32`,
    /// `quantize float32Block128`, `device(0)`); a C caller reads the header's: the enumerators
    /// and the values of a descriptor's `device` field, also in a peer's reason and a rank's
    /// failure. A failure below the library keeps its text, whatever words it holds.
    @Test func typesAndPlacesAreTheHeaders() throws {
        func thrown(_ body: () throws -> Void) -> EPError? {
            do { try body() } catch { return error as? EPError }
            return nil
        }
        func tokens(_ dtype: DataType, _ location: MemoryLocation = .host) -> TensorRef {
            TensorRef(address: UnsafeMutableRawPointer(bitPattern: 64), dtype: dtype, shape: [2, 8], location: location)
        }
        let dtype = try #require(thrown { try TensorCheck.require(tokens(.f32), "input.tokens", dtypes: [.bf16, .u8], shape: [2, 8]) })
        #expect(dtype.naming(.perRank).message == "invalid argument: inputs.tokens.dtype = epFloat32; must be epBFloat16 or epUInt8")
        let onDevice = try #require(thrown { try TensorCheck.require(tokens(.i32, .device(0)), "input.tokens", dtypes: [.i32], shape: [2, 8]) })
        #expect(onDevice.naming(.perRank).message == "invalid argument: inputs.tokens.device = 0; must be -1 (host)")
        let onHost = try #require(thrown { try TensorCheck.require(tokens(.i64), "input.tokens", dtypes: [.i64], shape: [2, 8], location: .device(1)) })
        #expect(onHost.naming(.perRank).message == "invalid argument: inputs.tokens.device = -1 (host); must be 1")
        let peer = EPError.peerFailed(rank: 0, peer: 1, reason: dtype.description)
        #expect(peer.naming(.perRank).message.hasSuffix("rejected its call: invalid argument: inputs.tokens.dtype = epFloat32; must be epBFloat16 or epUInt8"))
        let failure = RankFailure(rank: 1, error: onHost, config: GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, maxTokensPerRank: 2))
        #expect(failure.message == "rank 1: invalid argument: input.tokens.location = -1 (host); must be 1")
        let bytes = try CallShapes(GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 8, elementType: .u8, maxTokensPerRank: 2))
        let combine = try #require(thrown { try bytes.validateCombine(.absent, .absent, tokens: 0, direction: .forward) })
        #expect(combine.message == "invalid configuration: elementType = epUInt8; combine needs epBFloat16, epFloat16 or epFloat32 (epUInt8 is dispatch only)")
        // An FP8 mode as the config's epFP8Source_t and epFP8Scales_t name it.
        let rows = GroupConfig(algorithm: .lowLatency, ranks: 2, experts: 4, topK: 2, hidden: 80, elementType: .u8, maxTokensPerRank: 2,
                               fp8: FP8Dispatch(scales: .e8m0Block32, source: .passThrough))
        #expect(thrown { _ = try rows.validated() }?.message
            == "invalid configuration: elementType = epUInt8; must be epBFloat16, epFloat16 or epFloat32 with fp8 (epFP8PassThrough epFP8E8M0Block32): combine runs in it")
        var blocks = rows
        blocks.elementType = .bf16
        #expect(thrown { _ = try blocks.validated() }?.message == "invalid configuration: hidden = 80; must be a multiple of 32, the block of FP8 scale mode epFP8E8M0Block32")
        let log = EPError.lowerLayer(.callFailed(.nvrtc, call: "nvrtcCompileProgram", code: 6, name: "NVRTC_ERROR_COMPILATION", detail: "bf16 x = f32 y; device(0) = host;"))
        #expect(log.message == log.description)
        // The list of valid values, as C's: every enumerator and its value.
        #expect(throws: EPError.invalidArgument(field: "dtype", value: "9", requirement:
            "must be one of epBFloat16 (0), epFloat16 (1), epFloat32 (2), epInt32 (3), epInt64 (4), epUInt8 (5), epFloat8E4M3 (6)")) {
            try ABIEnum.dataType(epDataType_t(rawValue: 9), "dtype")
        }
    }

    /// The calls a message asks for are the entry points a C caller has: a group's calls complete
    /// with epGroupComplete, a rank's own (epDispatch, epCombine, epHandleUpdate) with epComplete.
    @Test func theCallsAMessageAsksForAreEntryPoints() {
        let open = EPError.sendOnlyOpen("dispatch").description
        #expect(cWording(open, entry: "epGroupDispatchStacked") == "call out of order: call epGroupComplete for the pending send-only dispatch first")
        #expect(cWording(open, entry: "epDispatch") == "call out of order: call epComplete for the pending send-only dispatch first")
        #expect(cWording(EPError.nothingToComplete.description, entry: "epComplete")
            == "call out of order: epComplete needs a dispatch or combine issued with phase epPhaseSendOnly")
        #expect(cWording("rank 2 is masked inactive; clean it before calling") == "rank 2 is masked inactive; clean it (epGroupCleanRanks) before calling")
        #expect(cWording("void (checkStatus() names it); clean() was called") == "void (epGroupCheckStatus names it); epGroupCleanRanks was called")
        #expect(cWording("must be NULL (this call: backward, HT)") == "must be NULL (this call: epBackward, HT)")
    }
}
