import ExpertParallelCUDA
import ExpertParallelKernels
import Testing

@Suite("Kernel compilation with NVRTC", .enabled(if: TestEnvironment.runsNVRTCTests, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"))
struct KernelCompileTests {
    @Test("every embedded kernel compiles for sm_90a", arguments: KernelSource.all.map(\.name))
    func embeddedKernelCompilesForHopper(name: String) throws {
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let kernel = try compiler.compile(KernelSource.embedded(name), arch: .hopper)
        #expect(kernel.format == .cubin)
        #expect(kernel.image.starts(with: [0x7F, 0x45, 0x4C, 0x46]), "a CUBIN is an ELF file")
        #expect(kernel.origin == .compiled)
    }

    @Test func nvrtcSupportsHopper() throws {
        let nvrtc = try NVRTCLibrary.shared()
        #expect(nvrtc.version.major >= 12)
        #expect(try nvrtc.supportedArchitectures().contains(90))
    }

    @Test func virtualArchGivesNULTerminatedPTXNamingTheKernel() throws {
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let kernel = try compiler.compile(.copy, arch: "compute_90a")
        #expect(kernel.format == .ptx)
        #expect(kernel.image.last == 0)
        #expect(String(decoding: kernel.image.dropLast(), as: UTF8.self).contains(".entry ep_copy_bytes"))
    }

    @Test func definesSpecialiseTheKernel() throws {
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let unrolledOnce = try compiler.compile(.copy, arch: "compute_90a", defines: ["EP_COPY_UNROLL": "1"])
        let unrolledEight = try compiler.compile(.copy, arch: "compute_90a", defines: ["EP_COPY_UNROLL": "8"])
        #expect(unrolledOnce.image != unrolledEight.image)
    }

    /// The bulk store instruction the bulk-copy dispatch emits (ep_transport_bulk.cuh).
    static let bulkStore = "cp.async.bulk.global.shared::cta.bulk_group"

    /// The PTX of embedded kernel `name` with `defines`.
    static func ptx(_ compiler: KernelCompiler, _ name: String, _ defines: [String: String]) throws -> String {
        let kernel = try compiler.compile(KernelSource.embedded(name), arch: "compute_90a", defines: defines)
        return String(decoding: kernel.image.dropLast(), as: UTF8.self)
    }

    /// The HT dispatch's bulk copies (ep_transport_bulk.cuh) are compiled only where asked and every
    /// rank is on one GPU, which the default defines above are not: compile that variant here too.
    @Test func htDispatchMovesRowsByBulkCopiesWhereEveryRankIsOnOneGPU() throws {
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        func ptx(_ defines: [String: String]) throws -> String { try Self.ptx(compiler, "ep_ht", defines) }
        #expect(try ptx(["EP_ONE_DEVICE": "1", "EP_HT_BULK": "1"]).contains(Self.bulkStore))
        #expect(try ptx(["EP_ONE_DEVICE": "1", "EP_HT_BULK": "1", "EP_FP8": "2", "EP_FP8_BLOCK": "128"]).contains(Self.bulkStore))
        #expect(try !ptx(["EP_ONE_DEVICE": "1", "EP_HT_BULK": "0"]).contains(Self.bulkStore))
        #expect(try !ptx(["EP_ONE_DEVICE": "0", "EP_HT_BULK": "1"]).contains(Self.bulkStore))
        #expect(try !ptx(["EP_ONE_DEVICE": "1", "EP_HT_BULK": "1", "EP_FP8": "1", "EP_FP8_BLOCK": "128"]).contains(Self.bulkStore))
        // (the LL dispatch has no bulk path: its variant measured 8-14 % slower and was removed)
        #expect(try !Self.ptx(compiler, "ep_ll", ["EP_ONE_DEVICE": "1", "EP_HT_BULK": "1"]).contains(Self.bulkStore))
        _ = try compiler.compile(KernelSource.embedded("ep_ht"), arch: .hopper, defines: ["EP_ONE_DEVICE": "1", "EP_HT_BULK": "1"])
    }

    @Test func compileErrorNamesTheCallAndCarriesTheLogWithTheFileAndLine() throws {
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let broken = KernelSource(name: "ep_broken", body: "extern \"C\" __global__ void k() {\n  undeclared_name = 1;\n}\n")
        #expect {
            _ = try compiler.compile(broken, arch: .hopper)
        } throws: { error in
            guard case .nvrtc(let call, let code, let name, let log)? = error as? CUDAError else { return false }
            return call == "nvrtcCompileProgram" && code == 6 && name == "NVRTC_ERROR_COMPILATION"
                && log.contains("ep_broken.cu(2)") && log.contains("undeclared_name")
        }
    }
}

@Suite("Embedded kernel sources")
struct KernelSourceTests {
    @Test func copyKernelIsEmbeddedWithTheSharedHelpersInFront() {
        let copy = KernelSource.copy
        #expect(copy.name == "ep_copy")
        #expect(copy.text.hasPrefix("#line 1 \"ep_common.cuh\"\n"))
        #expect(copy.text.contains("#line 1 \"ep_copy.cu\"\n"))
        #expect(copy.text.contains("extern \"C\" __global__ void ep_copy_bytes("))
    }

    @Test func everyCUFileIsAKernelSourceAndHelpersAreNot() {
        let names = KernelSource.all.map(\.name)
        #expect(names.contains("ep_copy"))
        #expect(names.contains("ep_selftest"))
        #expect(!names.contains("ep_common"))
        #expect(names == names.sorted())
    }

    @Test func hotKernelsIncludeNoHeaders() {
        for source in KernelSource.all {
            #expect(!source.text.contains("#include"), "\(source.name) includes a header")
        }
    }
}
