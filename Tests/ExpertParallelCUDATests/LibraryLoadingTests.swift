import Foundation
import Testing
@testable import ExpertParallelCUDA

@Suite("Loading the CUDA libraries")
struct LibraryLoadingTests {
    @Test func missingDriverIsAClearErrorNotACrash() {
        #expect {
            _ = try DriverLibrary.load(candidates: ["libcuda-not-installed.so.1"])
        } throws: { error in
            guard case .libraryUnavailable(let library, let attempts)? = error as? CUDAError else { return false }
            return library == "libcuda.so.1" && attempts.count == 1 && attempts[0].hasPrefix("libcuda-not-installed.so.1: ")
        }
    }

    @Test func missingDriverMeansNoDevice() throws {
        let error = CUDAError.libraryUnavailable(library: DriverLibrary.libraryName, attempts: [])
        #expect(error.meansNoDevice)
        #expect(CUDAError.driver(call: "cuInit", code: 100, name: "CUDA_ERROR_NO_DEVICE").meansNoDevice)
        #expect(!CUDAError.driver(call: "cuInit", code: 999, name: "CUDA_ERROR_UNKNOWN").meansNoDevice)
    }

    @Test func sharedDriverLoadsOrSaysItIsUnavailable() {
        do {
            let driver = try DriverLibrary.shared()
            #expect(!driver.location.isEmpty)
        } catch let error as CUDAError {
            guard case .libraryUnavailable(let library, _) = error else {
                Issue.record("unexpected error: \(error)")
                return
            }
            #expect(library == "libcuda.so.1")
            #expect(error.description.hasPrefix("libcuda.so.1 is not available"))
        } catch {
            Issue.record("not a CUDAError: \(error)")
        }
    }

    @Test func libraryWithoutTheDriverSymbolsNamesTheMissingSymbol() {
        #expect(throws: CUDAError.symbolMissing(library: "libcuda.so.1", symbol: "cuGetErrorName")) {
            _ = try DriverLibrary.load(candidates: ["libc.so.6"])
        }
    }

    @Test func missingNVRTCListsEveryPlaceTried() {
        #expect {
            _ = try NVRTCLibrary.load(candidates: ["/nonexistent/libnvrtc.so.13", "libnvrtc-not-installed.so.13"])
        } throws: { error in
            let text = "\(error)"
            return text.hasPrefix("libnvrtc.so.13 is not available")
                && text.contains("/nonexistent/libnvrtc.so.13: ") && text.contains("libnvrtc-not-installed.so.13: ")
        }
    }

    @Test func missingNCCLIsAClearError() {
        #expect(throws: CUDAError.self) {
            _ = try NCCLLibrary.load(candidates: ["libnccl-not-installed.so.2"])
        }
    }

    @Test func environmentVariableMayNameAFolderOrTheFile() {
        let variable = "EP_TEST_LIBRARY_LOCATION_\(UInt32.random(in: 0...UInt32.max))"
        setenv(variable, "/usr", 1)
        #expect(LibrarySearch.fromEnvironment(variable, fileName: "libx.so.1") == ["/usr/libx.so.1"])
        setenv(variable, "/opt/lib/libx.so.1", 1)
        #expect(LibrarySearch.fromEnvironment(variable, fileName: "libx.so.1") == ["/opt/lib/libx.so.1"])
        unsetenv(variable)
        #expect(LibrarySearch.fromEnvironment(variable, fileName: "libx.so.1").isEmpty)
    }
}

@Suite("CUDA errors")
struct CUDAErrorTests {
    @Test func driverErrorNamesTheCallAndTheCode() {
        let error = CUDAError.driver(call: "cuModuleLoadData", code: 218, name: "CUDA_ERROR_INVALID_PTX")
        #expect(error.description == "cuModuleLoadData failed: CUDA_ERROR_INVALID_PTX (218)")
        #expect(error.code == 218)
    }

    @Test func compileErrorCarriesTheProgramLog() {
        let error = CUDAError.nvrtc(
            call: "nvrtcCompileProgram", code: 6, name: "NVRTC_ERROR_COMPILATION", log: "k.cu(3): error: x is undefined\n\n")
        #expect(error.description == "nvrtcCompileProgram failed: NVRTC_ERROR_COMPILATION (6)\nk.cu(3): error: x is undefined")
    }

    @Test func ncclErrorNamesTheCall() {
        let error = CUDAError.nccl(call: "ncclGetVersion", code: 5, name: "ncclInvalidUsage")
        #expect(error.description == "ncclGetVersion failed: ncclInvalidUsage (5)")
    }

    @Test func archesKnowTheirImageFormat() {
        #expect(GPUArch.hopper.imageFormat == .cubin)
        #expect(GPUArch("compute_90a").imageFormat == .ptx)
        #expect(ComputeCapability(major: 9, minor: 0).nativeArch == "sm_90a")
        #expect(ComputeCapability(major: 8, minor: 0).nativeArch == "sm_80")
        #expect(ComputeCapability(major: 10, minor: 0).nativeArch == "sm_100a")
    }

    @Test func kernelArgumentsPackEachValueInItsOwnSlot() {
        let arguments = KernelArguments(DevicePointer(rawValue: 0x1000), Int32(-7), UInt64(42))
        #expect(arguments.count == 3)
        arguments.set(Int32(9), at: 1)
        arguments.withParameterArray { slots in
            #expect(slots![0]!.load(as: UInt64.self) == 0x1000)
            #expect(slots![1]!.load(as: Int32.self) == 9)
            #expect(slots![2]!.load(as: UInt64.self) == 42)
        }
    }
}
