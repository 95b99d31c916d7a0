import CExpertParallel
import ExpertParallel

extension GroupConfig {
    /// The configuration `c` describes, validated.
    init(_ c: epGroupConfig_t) throws(EPError) {
        // validated()'s bounds, checked before the 64-bit fields become `Int`.
        func bound(_ field: String, _ value: Int64, _ limit: Int) throws(EPError) -> Int {
            guard value <= Int64(limit) else {
                throw .invalidConfig(field: field, value: "\(value)", requirement: "must be ≤ \(limit)")
            }
            return Int(value)
        }
        let hidden = try bound("hidden", c.hidden, Self.maxCount)
        let maxTokens = try bound("maxTokensPerRank", c.maxTokensPerRank, Self.maxCount)
        let maxReceived = try bound("maxReceivedTokensPerRank", c.maxReceivedTokensPerRank, Self.maxReceivedTokens)
        let layoutValue = c.layout
        let alignment = c.alignment == 0 ? 1 : Int(c.alignment)
        if c.alignment != 0, c.alignment != 1, layoutValue != epLayoutExpertMajorPadded {
            throw .invalidConfig(field: "alignment", value: "\(c.alignment)", requirement: "must be 0 or 1 unless the layout is epLayoutExpertMajorPadded")
        }
        let timeout: Duration
        if c.timeoutSeconds == 0 {
            timeout = .seconds(10)
        } else {
            // The value is echoed as given (1e-12, not the 0 ns it would round to); the bounds are
            // the core's: at least 1 ns (the resolution of every wait), at most a day.
            guard c.timeoutSeconds.isFinite, c.timeoutSeconds >= 1e-9, c.timeoutSeconds <= 86_400 else {
                throw .invalidConfig(
                    field: "timeoutSeconds", value: "\(c.timeoutSeconds)",
                    requirement: "must be in [1e-9, 86400] seconds (1 ns to a day), or 0 for 10 s")
            }
            // To the nearest nanosecond: truncating made 1.001 s 1000999999 ns (the product is
            // 1000999999.9999999).
            timeout = .nanoseconds(Int64((c.timeoutSeconds * 1e9).rounded()))
        }
        self.init(
            algorithm: try ABIEnum.algorithm(c.algorithm, "algorithm"), ranks: Int(c.ranks), experts: Int(c.experts),
            topK: Int(c.topK), hidden: hidden, elementType: try ABIEnum.dataType(c.elementType, "elementType"),
            maxTokensPerRank: maxTokens, maxReceivedTokensPerRank: maxReceived == 0 ? nil : maxReceived,
            layout: try ABIEnum.layout(layoutValue, alignment: alignment, "layout"),
            overflow: try ABIEnum.overflow(c.overflow, "overflow"), timeout: timeout,
            fp8: try ABIEnum.fp8(c.fp8Scales, c.fp8Source))
        do {
            self = try validated()
        } catch {
            throw Self.cNamed(error, c)
        }
    }

    /// A core config error as the C fields say it: the layout as its enum name, the alignment by
    /// its own field (the rest of the C wording is `cWording`'s).
    private static func cNamed(_ error: EPError, _ c: epGroupConfig_t) -> EPError {
        guard case let .invalidConfig(field, value, requirement) = error else { return error }
        switch field {
        case "layout":
            let name = switch c.layout {
            case epLayoutExpertMajor: "epLayoutExpertMajor"
            case epLayoutRankMajor: "epLayoutRankMajor"
            case epLayoutFlat: "epLayoutFlat"
            default: "epLayoutExpertMajorPadded"
            }
            let algorithm = c.algorithm == epAlgorithmLowLatency ? "epAlgorithmLowLatency" : "epAlgorithmHighThroughput"
            return .invalidConfig(field: "layout", value: name, requirement: "is not a layout of algorithm \(algorithm): LL takes epLayoutExpertMajor or epLayoutRankMajor, HT takes epLayoutFlat or epLayoutExpertMajorPadded")
        case "layout.alignment":
            return .invalidConfig(field: "alignment", value: value, requirement: requirement)
        default:
            return error
        }
    }

    /// What `epGroupGetInfo` reports.
    func info(backend: epBackend_t) -> epGroupInfo_t {
        var info = epGroupInfo_t()
        info.structSize = epGroupInfo_t.abiSize
        info.backend = backend
        info.ranks = Int32(ranks)
        info.experts = Int32(experts)
        info.localExperts = Int32(localExperts)
        info.topK = Int32(topK)
        info.hidden = Int64(hidden)
        info.elementType = ABIEnum.dataType(elementType)
        info.algorithm = ABIEnum.algorithm(algorithm)
        info.layout = ABIEnum.layout(layout)
        info.alignment = Int32(alignment)
        info.maxTokensPerRank = Int64(maxTokensPerRank)
        info.receiveCapacity = Int64(receiveCapacity)
        info.receiveNdim = Int32(receiveShape.count)
        setInt64Values(&info.receiveShape, receiveShape)
        let routingShape = receiveRoutingShape ?? []
        info.receiveRoutingNdim = Int32(routingShape.count)
        setInt64Values(&info.receiveRoutingShape, routingShape)
        (info.fp8Scales, info.fp8Source) = ABIEnum.fp8(fp8)
        info.receiveElementType = ABIEnum.dataType(receiveElementType)
        let scalesShape = receiveScalesShape ?? []
        info.receiveScalesNdim = Int32(scalesShape.count)
        setInt64Values(&info.receiveScalesShape, scalesShape)
        return info
    }
}
