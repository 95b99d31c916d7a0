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

        var image: [UInt8]
        switch format {
        case .cubin:
            var size = 0
            try check(functions.nvrtcGetCUBINSize(program, &size), "nvrtcGetCUBINSize")
            image = [UInt8](repeating: 0, count: size)
            try image.withUnsafeMutableBytes { bytes in
                try check(functions.nvrtcGetCUBIN(program, bytes.baseAddress?.assumingMemoryBound(to: CChar.self)), "nvrtcGetCUBIN")
            }
        case .ptx:
            var size = 0
            try check(functions.nvrtcGetPTXSize(program, &size), "nvrtcGetPTXSize")
            image = [UInt8](repeating: 0, count: size)
            try image.withUnsafeMutableBytes { bytes in
                try check(functions.nvrtcGetPTX(program, bytes.baseAddress?.assumingMemoryBound(to: CChar.self)), "nvrtcGetPTX")
            }
        }
        return NVRTCOutput(image: image, format: format, log: log.trimmingTrailingWhitespace)
    }

    private func programLog(_ program: OpaquePointer?) throws -> String {
        var size = 0
        try check(functions.nvrtcGetProgramLogSize(program, &size), "nvrtcGetProgramLogSize")
        guard size > 1 else { return "" }
        var log = [CChar](repeating: 0, count: size)
        try check(functions.nvrtcGetProgramLog(program, &log), "nvrtcGetProgramLog")
        return String(decoding: log.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Calls `body` with a C array of NUL-terminated copies of `strings`.
func withCStringArray<Result>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>?) -> Result) -> Result {
    let copies = strings.map { UnsafePointer(strdup($0)) }
    defer { copies.forEach { free(UnsafeMutablePointer(mutating: $0)) } }
    return copies.withUnsafeBufferPointer { body($0.baseAddress) }
}
