import CExpertParallel
import ExpertParallel
import ExpertParallelGPU

/// The ABI's enumerations, checked: a value outside an enum's range is an `invalidArgument`
/// that names the field and lists the valid values.
enum ABIEnum {
    static func invalid(_ field: String, _ raw: UInt32, _ valid: String) -> EPError {
        .invalidArgument(field: field, value: "\(Int32(bitPattern: raw))", requirement: "must be one of \(valid)")
    }

    static func dataType(_ value: epDataType_t, _ field: @autoclosure () -> String) throws(EPError) -> DataType {
        switch value {
        case epBFloat16: .bf16
        case epFloat16: .f16
        case epFloat32: .f32
        case epInt32: .i32
        case epInt64: .i64
        case epUInt8: .u8
        case epFloat8E4M3: .e4m3
        default: throw invalid(field(), value.rawValue, DataType.allCases.map { "\(name($0)) (\(dataType($0).rawValue))" }.joined(separator: ", "))
        }
    }

    /// The epDataType_t enumerator of `type`, as the header spells it (the core says `f32`).
    static func name(_ type: DataType) -> String {
        switch type {
        case .bf16: "epBFloat16"
        case .f16: "epFloat16"
        case .f32: "epFloat32"
        case .i32: "epInt32"
        case .i64: "epInt64"
        case .u8: "epUInt8"
        case .e4m3: "epFloat8E4M3"
        }
    }

    static func dataType(_ type: DataType) -> epDataType_t {
        switch type {
        case .bf16: epBFloat16
        case .f16: epFloat16
        case .f32: epFloat32
        case .i32: epInt32
        case .i64: epInt64
        case .u8: epUInt8
        case .e4m3: epFloat8E4M3
        }
    }

    static func algorithm(_ value: epAlgorithm_t, _ field: @autoclosure () -> String) throws(EPError) -> Algorithm {
        switch value {
        case epAlgorithmLowLatency: .lowLatency
        case epAlgorithmHighThroughput: .highThroughput
        default: throw invalid(field(), value.rawValue, "epAlgorithmLowLatency (0), epAlgorithmHighThroughput (1)")
        }
    }

    static func algorithm(_ algorithm: Algorithm) -> epAlgorithm_t {
        algorithm == .lowLatency ? epAlgorithmLowLatency : epAlgorithmHighThroughput
    }

    /// nil for `epLayoutDefault` (the algorithm's default layout).
    static func layout(_ value: epLayout_t, alignment: Int, _ field: @autoclosure () -> String) throws(EPError) -> Layout? {
        switch value {
        case epLayoutDefault: nil
        case epLayoutExpertMajor: .expertMajor
        case epLayoutRankMajor: .rankMajor
        case epLayoutFlat: .flat
        case epLayoutExpertMajorPadded: .expertMajorPadded(alignment: alignment)
        default:
            throw invalid(field(), value.rawValue, "epLayoutDefault (0), epLayoutExpertMajor (1), epLayoutRankMajor (2), epLayoutFlat (3), epLayoutExpertMajorPadded (4)")
        }
    }

    static func layout(_ layout: Layout) -> epLayout_t {
        switch layout {
        case .expertMajor: epLayoutExpertMajor
        case .rankMajor: epLayoutRankMajor
        case .flat: epLayoutFlat
        case .expertMajorPadded: epLayoutExpertMajorPadded
        }
    }

    static func overflow(_ value: epOverflowPolicy_t, _ field: @autoclosure () -> String) throws(EPError) -> OverflowPolicy {
        switch value {
        case epOverflowFail: .fail
        case epOverflowDrop: .drop
        default: throw invalid(field(), value.rawValue, "epOverflowFail (0), epOverflowDrop (1)")
        }
    }

    static func direction(_ value: epPassDirection_t, _ field: @autoclosure () -> String) throws(EPError) -> PassDirection {
        switch value {
        case epForward: .forward
        case epBackward: .backward
        default: throw invalid(field(), value.rawValue, "epForward (0), epBackward (1)")
        }
    }

    static func launchMode(_ value: epLaunchMode_t, _ field: @autoclosure () -> String) throws(EPError) -> LaunchMode {
        switch value {
        case epLaunchSingle: .single
        case epLaunchPerRank: .perRank
        default: throw invalid(field(), value.rawValue, "epLaunchSingle (0), epLaunchPerRank (1)")
        }
    }

    static func fp8(_ scales: epFP8Scales_t, _ source: epFP8Source_t) throws(EPError) -> FP8Dispatch? {
        let mode: FP8ScaleMode? = switch scales {
        case epFP8None: nil
        case epFP8Float32Block128: .float32Block128
        case epFP8UE8M0Block128: .ue8m0Block128
        case epFP8E8M0Block32: .e8m0Block32
        default: throw invalid("fp8Scales", scales.rawValue, "epFP8None (0), epFP8Float32Block128 (1), epFP8UE8M0Block128 (2), epFP8E8M0Block32 (3)")
        }
        let from: FP8Dispatch.Source = switch source {
        case epFP8Quantize: .quantize
        case epFP8PassThrough: .passThrough
        default: throw invalid("fp8Source", source.rawValue, "epFP8Quantize (0), epFP8PassThrough (1)")
        }
        guard let mode else {
            guard from == .quantize else {
                throw .invalidConfig(field: "fp8Source", value: name(from), requirement: "needs an fp8Scales mode")
            }
            return nil
        }
        return FP8Dispatch(scales: mode, source: from)
    }

    /// The epFP8Scales_t enumerator of `mode`, as the header spells it (the core says `float32Block128`).
    static func name(_ mode: FP8ScaleMode) -> String {
        switch mode {
        case .float32Block128: "epFP8Float32Block128"
        case .ue8m0Block128: "epFP8UE8M0Block128"
        case .e8m0Block32: "epFP8E8M0Block32"
        }
    }

    /// The epFP8Source_t enumerator of `source`, as the header spells it (the core says `quantize`).
    static func name(_ source: FP8Dispatch.Source) -> String { source == .quantize ? "epFP8Quantize" : "epFP8PassThrough" }

    static func fp8(_ value: FP8Dispatch?) -> (epFP8Scales_t, epFP8Source_t) {
        guard let value else { return (epFP8None, epFP8Quantize) }
        let scales = switch value.scales {
        case .float32Block128: epFP8Float32Block128
        case .ue8m0Block128: epFP8UE8M0Block128
        case .e8m0Block32: epFP8E8M0Block32
        }
        return (scales, value.source == .quantize ? epFP8Quantize : epFP8PassThrough)
    }

    static func phase(_ value: epCallPhase_t, _ field: @autoclosure () -> String) throws(EPError) -> CallPhase {
        switch value {
        case epPhaseWhole: .whole
        case epPhaseSendOnly: .sendOnly
        default: throw invalid(field(), value.rawValue, "epPhaseWhole (0), epPhaseSendOnly (1)")
        }
    }
}
