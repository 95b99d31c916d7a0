/// How a group dispatches in FP8 (docs/fp8.md): rows move as OCP e4m3 with a scale per block of
/// `scales.blockSize` elements. Combine stays in the group's `elementType`.
public struct FP8Dispatch: Sendable, Hashable, CustomStringConvertible {
    /// Where the e4m3 rows come from.
    public enum Source: String, Sendable, Hashable {
        /// The dispatch quantises the caller's `elementType` rows (bf16, f16, f32).
        case quantize
        /// The caller gives e4m3 rows and their scales; dispatch moves both unchanged.
        case passThrough
    }

    public var scales: FP8ScaleMode
    public var source: Source

    public init(scales: FP8ScaleMode, source: Source = .quantize) {
        self.scales = scales
        self.source = source
    }

    public var description: String { "\(source.rawValue) \(scales)" }

    /// The element type of the scale words: float32 scales, or four exponent bytes per int32.
    public var scaleType: DataType { scales == .float32Block128 ? .f32 : .i32 }
}

extension GroupConfig {
    /// The row format of an FP8 group (nil otherwise); its hidden size was checked by `validated()`.
    public var fp8Format: FP8RowFormat? { fp8.flatMap { try? FP8RowFormat(mode: $0.scales, hidden: hidden) } }

    /// The element type of the rows a dispatch writes: e4m3 for an FP8 group.
    public var receiveElementType: DataType { fp8 == nil ? elementType : .e4m3 }

    /// The element type of the rows a dispatch reads: e4m3 for an FP8 pass-through group.
    public var dispatchInputType: DataType { fp8?.source == .passThrough ? .e4m3 : elementType }

    /// Bytes of one row as a dispatch moves it.
    public var wireRowBytes: Int { fp8 == nil ? rowBytes : hidden }

    /// The shape of the received scales (FP8 groups): the receive shape with its last dimension
    /// replaced by the scale words of a row.
    public var receiveScalesShape: [Int]? {
        guard let format = fp8Format else { return nil }
        return Array(receiveShape.dropLast()) + [format.scaleWordsPerRow]
    }

    /// Types accepted for e4m3 rows: e4m3, or uint8 holding the codes (NumPy has no FP8).
    static func rowTypes(_ type: DataType) -> [DataType] { type == .e4m3 ? [.e4m3, .u8] : [type] }
}
