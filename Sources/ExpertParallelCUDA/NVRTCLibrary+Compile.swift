#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What one NVRTC compilation produced.
public struct NVRTCOutput: Sendable {
    /// CUBIN bytes, or PTX text with its terminating NUL (ready for `cuModuleLoadData`).
    public var image: [UInt8]
    public var format: KernelImageFormat
    /// The program log (warnings); empty when the compiler had nothing to say.
    public var log: String
}

extension NVRTCLibrary {
    /// Compiles one self-contained CUDA C++ source (no headers) with the given options,
    /// and returns CUBIN or PTX. A failed compilation throws `CUDAError.nvrtc` whose
    /// message carries the program log.
    public func compile(source: String, name: String, options: [String], format: KernelImageFormat) throws -> NVRTCOutput {
        var program: OpaquePointer?
        try check(functions.nvrtcCreateProgram(&program, source, name, 0, nil, nil), "nvrtcCreateProgram")
        defer { _ = functions.nvrtcDestroyProgram(&program) }

        let result = withCStringArray(options) { functions.nvrtcCompileProgram(program, Int32(options.count), $0) }
        let log = try programLog(program)
        try check(result, "nvrtcCompileProgram", log: "\(name):\n\(log)")

        let image = switch format {
        case .cubin:
            try output(of: program, functions.nvrtcGetCUBINSize, "nvrtcGetCUBINSize", functions.nvrtcGetCUBIN, "nvrtcGetCUBIN")
        case .ptx:
            try output(of: program, functions.nvrtcGetPTXSize, "nvrtcGetPTXSize", functions.nvrtcGetPTX, "nvrtcGetPTX")
        }
        return NVRTCOutput(image: image, format: format, log: log.trimmingTrailingWhitespace)
    }

    private func programLog(_ program: OpaquePointer?) throws -> String {
        let log = try output(
            of: program, functions.nvrtcGetProgramLogSize, "nvrtcGetProgramLogSize",
            functions.nvrtcGetProgramLog, "nvrtcGetProgramLog")
        return String(decoding: log.prefix(while: { $0 != 0 }), as: UTF8.self)
    }

    /// One of NVRTC's size-then-contents pairs (CUBIN, PTX, log), as bytes.
    private func output(
        of program: OpaquePointer?,
        _ getSize: (OpaquePointer?, UnsafeMutablePointer<Int>?) -> Int32, _ sizeCall: StaticString,
        _ getContents: (OpaquePointer?, UnsafeMutablePointer<CChar>?) -> Int32, _ contentsCall: StaticString
    ) throws -> [UInt8] {
        var size = 0
        try check(getSize(program, &size), sizeCall)
        var bytes = [UInt8](repeating: 0, count: size)
        try bytes.withUnsafeMutableBytes { buffer in
            try check(getContents(program, buffer.baseAddress?.assumingMemoryBound(to: CChar.self)), contentsCall)
        }
        return bytes
    }
}

/// Calls `body` with a C array of NUL-terminated copies of `strings`.
func withCStringArray<Result>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>?) -> Result) -> Result {
    let copies = strings.map { UnsafePointer(strdup($0)) }
    defer { copies.forEach { free(UnsafeMutablePointer(mutating: $0)) } }
    return copies.withUnsafeBufferPointer { body($0.baseAddress) }
}
