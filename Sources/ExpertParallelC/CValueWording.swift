import ExpertParallel

/// A message of the core with the values a C caller gives as the header's enumerators and fields
/// in the header's words: an element type is its epDataType_t (`epFloat32`, where the core says
/// `f32`), an FP8 mode its epFP8Source_t and epFP8Scales_t (`epFP8Quantize epFP8Float32Block128`,
/// where the core says `quantize float32Block128`), and a tensor's place what its `device` field
/// holds (`-1 (host)`, `0`, where the core says `host`, `device(0)`).
func cValueWording(_ message: String) -> String {
    fp8Modes.reduce(message) { $0.replacing($1.core, with: $1.c) }
        .replacing(/\b[a-z][A-Za-z0-9]*\b/) { enumerators[String($0.output)] ?? String($0.output) }
        .replacing(/\bdevice\((\d+)\)/) { String($0.1) }
        .replacing("= host;", with: "= -1 (host);").replacing("must be host", with: "must be -1 (host)")
}

/// The core's name of each element type and FP8 scale mode, and its enumerator's.
private let enumerators = Dictionary(uniqueKeysWithValues:
    DataType.allCases.map { ($0.rawValue, ABIEnum.name($0)) } + FP8ScaleMode.allCases.map { ($0.rawValue, ABIEnum.name($0)) })

/// Each FP8 mode as the core describes it (`quantize float32Block128`), and in the header's words.
private let fp8Modes = FP8ScaleMode.allCases.flatMap { mode in
    [FP8Dispatch.Source.quantize, .passThrough].map { source in
        (core: "\(FP8Dispatch(scales: mode, source: source))", c: "\(ABIEnum.name(source)) \(ABIEnum.name(mode))")
    }
}
