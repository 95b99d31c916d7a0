/// The NVRTC entry points this package calls, resolved once from `libnvrtc.so.13`
/// (signatures from nvrtc.h; `nvrtcProgram` is an opaque pointer).
struct NVRTCFunctions {
    typealias Result = Int32
    typealias Program = OpaquePointer?
    typealias SizeOut = UnsafeMutablePointer<Int>?
    typealias CStringArray = UnsafePointer<UnsafePointer<CChar>?>?

    let nvrtcGetErrorString: @convention(c) (Result) -> UnsafePointer<CChar>?
    let nvrtcVersion: @convention(c) (UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?) -> Result
    let nvrtcGetNumSupportedArchs: @convention(c) (UnsafeMutablePointer<Int32>?) -> Result
    let nvrtcGetSupportedArchs: @convention(c) (UnsafeMutablePointer<Int32>?) -> Result
    let nvrtcCreateProgram: @convention(c) (
        UnsafeMutablePointer<OpaquePointer?>?, UnsafePointer<CChar>?, UnsafePointer<CChar>?, Int32, CStringArray, CStringArray
    ) -> Result
    let nvrtcDestroyProgram: @convention(c) (UnsafeMutablePointer<OpaquePointer?>?) -> Result
    let nvrtcCompileProgram: @convention(c) (Program, Int32, CStringArray) -> Result
    let nvrtcGetPTXSize: @convention(c) (Program, SizeOut) -> Result
    let nvrtcGetPTX: @convention(c) (Program, UnsafeMutablePointer<CChar>?) -> Result
    let nvrtcGetCUBINSize: @convention(c) (Program, SizeOut) -> Result
    let nvrtcGetCUBIN: @convention(c) (Program, UnsafeMutablePointer<CChar>?) -> Result
    let nvrtcGetProgramLogSize: @convention(c) (Program, SizeOut) -> Result
    let nvrtcGetProgramLog: @convention(c) (Program, UnsafeMutablePointer<CChar>?) -> Result

    init(_ library: DynamicLibrary) throws {
        nvrtcGetErrorString = try library.function("nvrtcGetErrorString")
        nvrtcVersion = try library.function("nvrtcVersion")
        nvrtcGetNumSupportedArchs = try library.function("nvrtcGetNumSupportedArchs")
        nvrtcGetSupportedArchs = try library.function("nvrtcGetSupportedArchs")
        nvrtcCreateProgram = try library.function("nvrtcCreateProgram")
        nvrtcDestroyProgram = try library.function("nvrtcDestroyProgram")
        nvrtcCompileProgram = try library.function("nvrtcCompileProgram")
        nvrtcGetPTXSize = try library.function("nvrtcGetPTXSize")
        nvrtcGetPTX = try library.function("nvrtcGetPTX")
        nvrtcGetCUBINSize = try library.function("nvrtcGetCUBINSize")
        nvrtcGetCUBIN = try library.function("nvrtcGetCUBIN")
        nvrtcGetProgramLogSize = try library.function("nvrtcGetProgramLogSize")
        nvrtcGetProgramLog = try library.function("nvrtcGetProgramLog")
    }
}
