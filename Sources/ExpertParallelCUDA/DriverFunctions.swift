import CExpertParallelShim

/// The driver API entry points this package calls, resolved once from `libcuda.so.1`.
///
/// Each field is typed like its C declaration in CUDA 13's cuda.h, and looked up under the
/// versioned name that cuda.h maps the plain name to (`cuMemAlloc` is `cuMemAlloc_v2`,
/// `cuGraphInstantiate` is `cuGraphInstantiateWithFlags`, …), with older names as fallbacks
/// where the signature is the same.
struct DriverFunctions {
    typealias Result = Int32
    typealias Handle = OpaquePointer?
    typealias HandleOut = UnsafeMutablePointer<OpaquePointer?>?
    typealias DevicePtr = UInt64
    typealias KernelParams = UnsafeMutablePointer<UnsafeMutableRawPointer?>?

    let cuGetErrorName: @convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>?) -> Result
    let cuGetErrorString: @convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>?) -> Result
    let cuInit: @convention(c) (UInt32) -> Result
    let cuDriverGetVersion: @convention(c) (UnsafeMutablePointer<Int32>?) -> Result

    let cuDeviceGet: @convention(c) (UnsafeMutablePointer<Int32>?, Int32) -> Result
    let cuDeviceGetCount: @convention(c) (UnsafeMutablePointer<Int32>?) -> Result
    let cuDeviceGetName: @convention(c) (UnsafeMutablePointer<CChar>?, Int32, Int32) -> Result
    let cuDeviceGetAttribute: @convention(c) (UnsafeMutablePointer<Int32>?, Int32, Int32) -> Result
    let cuDeviceTotalMem: @convention(c) (UnsafeMutablePointer<Int>?, Int32) -> Result
    let cuDeviceGetPCIBusId: @convention(c) (UnsafeMutablePointer<CChar>?, Int32, Int32) -> Result

    let cuDevicePrimaryCtxRetain: @convention(c) (HandleOut, Int32) -> Result
    let cuDevicePrimaryCtxRelease: @convention(c) (Int32) -> Result
    let cuCtxSetCurrent: @convention(c) (Handle) -> Result
    let cuCtxGetCurrent: @convention(c) (HandleOut) -> Result
    let cuCtxSynchronize: @convention(c) () -> Result

    let cuMemGetInfo: @convention(c) (UnsafeMutablePointer<Int>?, UnsafeMutablePointer<Int>?) -> Result
    let cuMemAlloc: @convention(c) (UnsafeMutablePointer<DevicePtr>?, Int) -> Result
    let cuMemFree: @convention(c) (DevicePtr) -> Result
    let cuMemAllocHost: @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>?, Int) -> Result
    let cuMemFreeHost: @convention(c) (UnsafeMutableRawPointer?) -> Result
    let cuMemcpyHtoD: @convention(c) (DevicePtr, UnsafeRawPointer?, Int) -> Result
    let cuMemcpyDtoH: @convention(c) (UnsafeMutableRawPointer?, DevicePtr, Int) -> Result
    let cuMemcpyDtoD: @convention(c) (DevicePtr, DevicePtr, Int) -> Result
    let cuMemcpyHtoDAsync: @convention(c) (DevicePtr, UnsafeRawPointer?, Int, Handle) -> Result
    let cuMemcpyDtoHAsync: @convention(c) (UnsafeMutableRawPointer?, DevicePtr, Int, Handle) -> Result
    let cuMemcpyDtoDAsync: @convention(c) (DevicePtr, DevicePtr, Int, Handle) -> Result
    let cuMemsetD8: @convention(c) (DevicePtr, UInt8, Int) -> Result
    let cuMemsetD8Async: @convention(c) (DevicePtr, UInt8, Int, Handle) -> Result

    let cuStreamCreate: @convention(c) (HandleOut, UInt32) -> Result
    let cuStreamSynchronize: @convention(c) (Handle) -> Result
    let cuStreamDestroy: @convention(c) (Handle) -> Result
    let cuStreamWaitEvent: @convention(c) (Handle, Handle, UInt32) -> Result

    let cuEventCreate: @convention(c) (HandleOut, UInt32) -> Result
    let cuEventRecord: @convention(c) (Handle, Handle) -> Result
    let cuEventSynchronize: @convention(c) (Handle) -> Result
    let cuEventQuery: @convention(c) (Handle) -> Result
    let cuEventElapsedTime: @convention(c) (UnsafeMutablePointer<Float>?, Handle, Handle) -> Result
    let cuEventDestroy: @convention(c) (Handle) -> Result

    let cuModuleLoadData: @convention(c) (HandleOut, UnsafeRawPointer?) -> Result
    let cuModuleUnload: @convention(c) (Handle) -> Result
    let cuModuleGetFunction: @convention(c) (HandleOut, Handle, UnsafePointer<CChar>?) -> Result
    let cuModuleGetGlobal: @convention(c) (UnsafeMutablePointer<DevicePtr>?, UnsafeMutablePointer<Int>?, Handle, UnsafePointer<CChar>?) -> Result
    let cuFuncSetAttribute: @convention(c) (Handle, Int32, Int32) -> Result
    let cuFuncGetAttribute: @convention(c) (UnsafeMutablePointer<Int32>?, Int32, Handle) -> Result
    /// CUDA 12.4+: loads a function now instead of at its first launch (lazy loading).
    let cuFuncLoad: (@convention(c) (Handle) -> Result)?
    let cuLaunchKernel: @convention(c) (
        Handle, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, Handle, KernelParams, KernelParams
    ) -> Result
    /// CUDA 12+: a launch with attributes (programmatic dependent launch).
    let cuLaunchKernelEx: (@convention(c) (UnsafePointer<ep_cu_launch_config>?, Handle, KernelParams, KernelParams) -> Result)?
    let cuOccupancyMaxActiveBlocksPerMultiprocessor: @convention(c) (UnsafeMutablePointer<Int32>?, Handle, Int32, Int) -> Result

    let cuStreamBeginCapture: @convention(c) (Handle, Int32) -> Result
    let cuThreadExchangeStreamCaptureMode: @convention(c) (UnsafeMutablePointer<Int32>?) -> Result
    let cuStreamEndCapture: @convention(c) (Handle, HandleOut) -> Result
    let cuGraphInstantiate: @convention(c) (HandleOut, Handle, UInt64) -> Result
    let cuGraphLaunch: @convention(c) (Handle, Handle) -> Result
    let cuGraphExecDestroy: @convention(c) (Handle) -> Result
    let cuGraphDestroy: @convention(c) (Handle) -> Result

    init(_ library: DynamicLibrary) throws {
        cuGetErrorName = try library.function("cuGetErrorName")
        cuGetErrorString = try library.function("cuGetErrorString")
        cuInit = try library.function("cuInit")
        cuDriverGetVersion = try library.function("cuDriverGetVersion")

        cuDeviceGet = try library.function("cuDeviceGet")
        cuDeviceGetCount = try library.function("cuDeviceGetCount")
        cuDeviceGetName = try library.function("cuDeviceGetName")
        cuDeviceGetAttribute = try library.function("cuDeviceGetAttribute")
        cuDeviceTotalMem = try library.function("cuDeviceTotalMem_v2")
        cuDeviceGetPCIBusId = try library.function("cuDeviceGetPCIBusId")

        cuDevicePrimaryCtxRetain = try library.function("cuDevicePrimaryCtxRetain")
        cuDevicePrimaryCtxRelease = try library.function("cuDevicePrimaryCtxRelease_v2")
        cuCtxSetCurrent = try library.function("cuCtxSetCurrent")
        cuCtxGetCurrent = try library.function("cuCtxGetCurrent")
        cuCtxSynchronize = try library.function("cuCtxSynchronize")

        cuMemGetInfo = try library.function("cuMemGetInfo_v2")
        cuMemAlloc = try library.function("cuMemAlloc_v2")
        cuMemFree = try library.function("cuMemFree_v2")
        cuMemAllocHost = try library.function("cuMemAllocHost_v2")
        cuMemFreeHost = try library.function("cuMemFreeHost")
        cuMemcpyHtoD = try library.function("cuMemcpyHtoD_v2")
        cuMemcpyDtoH = try library.function("cuMemcpyDtoH_v2")
        cuMemcpyDtoD = try library.function("cuMemcpyDtoD_v2")
        cuMemcpyHtoDAsync = try library.function("cuMemcpyHtoDAsync_v2")
        cuMemcpyDtoHAsync = try library.function("cuMemcpyDtoHAsync_v2")
        cuMemcpyDtoDAsync = try library.function("cuMemcpyDtoDAsync_v2")
        cuMemsetD8 = try library.function("cuMemsetD8_v2")
        cuMemsetD8Async = try library.function("cuMemsetD8Async")

        cuStreamCreate = try library.function("cuStreamCreate")
        cuStreamSynchronize = try library.function("cuStreamSynchronize")
        cuStreamDestroy = try library.function("cuStreamDestroy_v2")
        cuStreamWaitEvent = try library.function("cuStreamWaitEvent")

        cuEventCreate = try library.function("cuEventCreate")
        cuEventRecord = try library.function("cuEventRecord")
        cuEventSynchronize = try library.function("cuEventSynchronize")
        cuEventQuery = try library.function("cuEventQuery")
        // _v2 (CUDA 12.8+) reports errors for events recorded without timing; same signature.
        cuEventElapsedTime = try library.function("cuEventElapsedTime_v2", "cuEventElapsedTime")
        cuEventDestroy = try library.function("cuEventDestroy_v2")

        cuModuleLoadData = try library.function("cuModuleLoadData")
        cuModuleUnload = try library.function("cuModuleUnload")
        cuModuleGetFunction = try library.function("cuModuleGetFunction")
        cuModuleGetGlobal = try library.function("cuModuleGetGlobal_v2")
        cuFuncSetAttribute = try library.function("cuFuncSetAttribute")
        cuFuncGetAttribute = try library.function("cuFuncGetAttribute")
        cuFuncLoad = library.optionalFunction("cuFuncLoad")
        cuLaunchKernel = try library.function("cuLaunchKernel")
        cuLaunchKernelEx = library.optionalFunction("cuLaunchKernelEx")
        cuOccupancyMaxActiveBlocksPerMultiprocessor = try library.function("cuOccupancyMaxActiveBlocksPerMultiprocessor")

        cuStreamBeginCapture = try library.function("cuStreamBeginCapture_v2")
        cuThreadExchangeStreamCaptureMode = try library.function("cuThreadExchangeStreamCaptureMode")
        cuStreamEndCapture = try library.function("cuStreamEndCapture")
        cuGraphInstantiate = try library.function("cuGraphInstantiateWithFlags")
        cuGraphLaunch = try library.function("cuGraphLaunch")
        cuGraphExecDestroy = try library.function("cuGraphExecDestroy")
        cuGraphDestroy = try library.function("cuGraphDestroy")
    }
}
