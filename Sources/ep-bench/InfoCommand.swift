import ArgumentParser
import ExpertParallelCUDA
import ExpertParallelKernels

/// `ep-bench info`: what this machine offers (device, driver, NVRTC, NCCL) and whether every
/// embedded kernel compiles for the device's arch, or for `--arch` when there is no GPU (CI).
/// Fails only when a kernel does not compile; missing libraries are reported, not fatal.
struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Print the device, driver, NVRTC and NCCL versions, and check that every kernel compiles.",
        discussion: exitStatusText)

    @Option(parsing: .unconditional, help: "Architecture to compile for, sm_<number> or compute_<number> with a or f after the number or not (default: the device's own, else sm_90a).")
    var arch: String?

    @Option(parsing: .unconditional, help: "Device ordinal to describe. (default: 0)", transform: NumberArgument.whole(bound: "≥ 0"))
    var device: Int = 0

    @Flag(help: "Compile every kernel even when the disk cache has it.")
    var noCache = false

    func validate() throws {
        guard device >= 0 else { throw ValidationError("--device \(device) is out of range: must be ≥ 0") }
        if let arch, !Self.isArchName(arch) {
            throw ValidationError("--arch \(arch) is not an architecture's name: must be sm_<number> or compute_<number>, with a or f after the number or not (sm_90a, sm_100f, compute_90)")
        }
    }

    /// `sm_90`, `sm_90a`, `sm_100f`, `compute_90`, ...: what NVRTC's --gpu-architecture takes.
    /// (Whether this NVRTC knows that number is its own answer: a kernel that does not compile.)
    static func isArchName(_ text: String) -> Bool {
        for prefix in ["sm_", "compute_"] where text.hasPrefix(prefix) {
            var number = text.dropFirst(prefix.count)
            if number.last == "a" || number.last == "f" { number = number.dropLast() }
            return !number.isEmpty && number.allSatisfy { $0.isASCII && $0.isNumber }
        }
        return false
    }

    func run() throws {
        let deviceArch = describeDevice()
        let targetArch = arch.map(GPUArch.init(rawValue:)) ?? deviceArch ?? .hopper
        describeNCCL()
        guard let nvrtc = describeNVRTC() else {
            print("kernels: not checked (no NVRTC)")
            return
        }
        let compiler = KernelCompiler(nvrtc: nvrtc, cache: noCache ? nil : .default)
        print("kernels (\(targetArch), \(targetArch.imageFormat)):")
        var failures = 0
        for source in KernelSource.all {
            let clock = ContinuousClock()
            let start = clock.now
            do {
                let kernel = try compiler.compile(source, arch: targetArch)
                let origin = kernel.origin == .compiled ? "\(milliseconds(clock.now - start)) ms" : "cached"
                print("  \(source.name): ok (\(kernel.image.count) bytes, \(origin))")
                if !kernel.log.isEmpty { print(indent(kernel.log, by: "    ")) }
            } catch {
                failures += 1
                print("  \(source.name): FAILED")
                print(indent("\(error)", by: "    "))
            }
        }
        if failures > 0 {
            print("\(failures) of \(KernelSource.all.count) kernels failed to compile")
            throw ExitCode.failure
        }
    }

    /// Prints the driver and device; returns the device's arch, or nil with no GPU.
    private func describeDevice() -> GPUArch? {
        let driver: DriverLibrary
        do {
            driver = try DriverLibrary.shared()
            try driver.initialize()
        } catch let error as CUDAError where error.meansNoDevice {
            print("device: none (no GPU or no CUDA driver here)")
            print(indent("\(error)", by: "  "))
            return nil
        } catch {
            print("device: none (\(error))")
            return nil
        }
        do {
            let version = try driver.driverVersion()
            print("driver: CUDA \(version / 1000).\(version % 1000 / 10) (\(driver.location))")
            let count = try driver.deviceCount()
            guard device < count else {
                print("device: ordinal \(device) does not exist (\(count) devices)")
                return nil
            }
            let handle = try driver.device(ordinal: device)
            let capability = try driver.computeCapability(of: handle)
            let sms = try driver.attribute(.multiprocessorCount, of: handle)
            let gib = try driver.totalMemory(of: handle) * 10 / (1 << 30)
            let clock = (try? driver.attribute(.clockRate, of: handle)).map { "\($0 / 1000) MHz" } ?? "n/a"
            print("device \(device) of \(count): \(try driver.name(of: handle))")
            print("  SMs: \(sms), compute capability \(capability) (\(capability.nativeArch)), clock \(clock)")
            print("  memory: \(gib / 10).\(gib % 10) GiB")
            return capability.nativeArch
        } catch {
            print("device: query failed: \(error)")
            return nil
        }
    }

    private func describeNVRTC() -> NVRTCLibrary? {
        do {
            let nvrtc = try NVRTCLibrary.shared()
            print("NVRTC: \(nvrtc.version.major).\(nvrtc.version.minor) (\(nvrtc.location))")
            return nvrtc
        } catch {
            print("NVRTC: not found")
            print(indent("\(error)", by: "  "))
            return nil
        }
    }

    private func describeNCCL() {
        do {
            let nccl = try NCCLLibrary.shared()
            let version = try nccl.version()
            print("NCCL: \(version.major).\(version.minor).\(version.patch) (\(nccl.location))")
        } catch {
            print("NCCL: not found")
        }
    }

    private func milliseconds(_ duration: Duration) -> Int64 {
        duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
    }

    private func indent(_ text: String, by prefix: String) -> String {
        text.split(separator: "\n", omittingEmptySubsequences: false).map { prefix + $0 }.joined(separator: "\n")
    }
}
