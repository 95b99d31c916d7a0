/// Element type of a tensor. Token payloads use `bf16`, `f16`, `f32`, or `u8` (raw bytes,
/// dispatch only); routing uses `i32`/`i64` indices and `f32` weights; `e4m3` is OCP FP8 (torch
/// `float8_e4m3fn`), the rows of an FP8 dispatch (docs/fp8.md).
public enum DataType: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case bf16, f16, f32, i32, i64, u8, e4m3

    public var byteSize: Int {
        switch self {
        case .bf16, .f16: 2
        case .f32, .i32: 4
        case .i64: 8
        case .u8, .e4m3: 1
        }
    }

    /// Types a token payload may have. Combine additionally needs a floating type.
    public var isTokenType: Bool { self == .bf16 || self == .f16 || self == .f32 || self == .u8 }
    public var isFloating: Bool { self == .bf16 || self == .f16 || self == .f32 }
    public var isIndex: Bool { self == .i32 || self == .i64 }

    public var description: String { rawValue }
}
