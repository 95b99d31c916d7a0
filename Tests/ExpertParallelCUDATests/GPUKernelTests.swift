import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelKernels
import Testing

@Suite("Kernels on the GPU", .serialized, .enabled(if: TestEnvironment.runsGPUTests, "EP_GPU_TESTS=1 runs GPU tests"))
struct GPUKernelTests {
    @Test func deviceReportsItsShape() throws {
        let gpu = try GPU()
        #expect(try gpu.driver.deviceCount() >= 1)
        #expect(gpu.multiprocessors > 0)
        #expect(try gpu.driver.totalMemory(of: gpu.device) > 1 << 30)
        #expect(try gpu.driver.driverVersion() >= 12000)
        #expect(try !gpu.driver.name(of: gpu.device).isEmpty)
    }

    @Test("ep_copy_bytes copies exactly the requested bytes", arguments: [0, 1, 15, 16, 17, 4099, (1 << 20) + 5], [0, 1])
    func copyKernelCopiesExactly(byteCount: Int, sourceOffset: Int) throws {
        let gpu = try GPU()
        let driver = gpu.driver
        let (module, kernel) = try gpu.kernel("ep_copy_bytes", in: .copy)
        defer { try? driver.unload(module) }

        let padding = 64
        let pattern = (0..<(byteCount + padding)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let source = try gpu.upload(pattern)
        let destination = try driver.allocate(byteCount: byteCount + padding)
        defer { try? driver.free(source); try? driver.free(destination) }
        try driver.fill(destination, byte: 0xAB, byteCount: byteCount + padding)

        let arguments = KernelArguments(destination, source.advanced(by: sourceOffset), UInt64(byteCount))
        try driver.launch(kernel, grid: gpu.grid(for: max(1, byteCount / 16)), block: 256, arguments: arguments)
        try driver.synchronize(CUDAStream(rawValue: nil))   // the legacy stream the launch used, not the context (graph captures run beside)

        let copied = try driver.read(UInt8.self, from: destination, count: byteCount + padding)
        #expect(Array(copied.prefix(byteCount)) == Array(pattern[sourceOffset..<(sourceOffset + byteCount)]))
        #expect(copied.suffix(padding).allSatisfy { $0 == 0xAB }, "no byte written past the end")
    }

    @Test func capturedGraphReplaysTheCopyWithCurrentData() throws {
        let gpu = try GPU()
        let driver = gpu.driver
        let (module, kernel) = try gpu.kernel("ep_copy_bytes", in: .copy)
        defer { try? driver.unload(module) }
        let count = 1 << 16
        let source = try gpu.upload([UInt8](repeating: 1, count: count))
        let destination = try driver.allocate(byteCount: count)
        let stream = try driver.createStream()
        defer { try? driver.free(source); try? driver.free(destination); try? driver.destroy(stream) }

        try driver.beginCapture(on: stream)
        try driver.launch(kernel, grid: gpu.grid(for: count / 16), block: 256, stream: stream,
                          arguments: KernelArguments(destination, source, UInt64(count)))
        let graph = try driver.endCapture(on: stream)
        let exec = try driver.instantiate(graph)
        defer { try? driver.destroy(exec); try? driver.destroy(graph) }

        try driver.launch(exec, on: stream)
        try driver.synchronize(stream)
        #expect(try driver.read(UInt8.self, from: destination, count: count).allSatisfy { $0 == 1 })
        try driver.fill(source, byte: 2, byteCount: count, stream: stream)
        try driver.launch(exec, on: stream)
        try driver.synchronize(stream)
        #expect(try driver.read(UInt8.self, from: destination, count: count).allSatisfy { $0 == 2 })
    }

    @Test func eventsTimeACopy() throws {
        let gpu = try GPU()
        let driver = gpu.driver
        let (module, kernel) = try gpu.kernel("ep_copy_bytes", in: .copy)
        defer { try? driver.unload(module) }
        let count = 64 << 20
        let source = try driver.allocate(byteCount: count)
        let destination = try driver.allocate(byteCount: count)
        let stream = try driver.createStream()
        let start = try driver.createEvent()
        let end = try driver.createEvent()
        defer {
            try? driver.free(source); try? driver.free(destination); try? driver.destroy(stream)
            try? driver.destroy(start); try? driver.destroy(end)
        }
        let blocks = try driver.maxActiveBlocksPerMultiprocessor(kernel, blockSize: 256)
        #expect(blocks > 0)
        try driver.record(start, on: stream)
        try driver.launch(kernel, grid: LaunchDimensions(x: UInt32(blocks * gpu.multiprocessors)), block: 256, stream: stream,
                          arguments: KernelArguments(destination, source, UInt64(count)))
        try driver.record(end, on: stream)
        try driver.synchronize(end)
        #expect(try driver.isComplete(end))
        #expect(try driver.elapsedMilliseconds(from: start, to: end) > 0)
    }
}

@Suite("Device helpers match the CPU oracle", .serialized, .enabled(if: TestEnvironment.runsGPUTests, "EP_GPU_TESTS=1 runs GPU tests"))
struct GPUHelperTests {
    /// Runs an `ep_selftest_*` kernel of shape (in, out, count) over `input`.
    static func run<In: BitwiseCopyable, Out: BitwiseCopyable>(_ name: String, _ input: [In], as: Out.Type) throws -> [Out] {
        let gpu = try GPU()
        let driver = gpu.driver
        let (module, kernel) = try gpu.kernel(name, in: KernelSource.embedded("ep_selftest"))
        defer { try? driver.unload(module) }
        let inputs = try gpu.upload(input)
        let outputs = try driver.allocate(byteCount: input.count * MemoryLayout<Out>.stride)
        defer { try? driver.free(inputs); try? driver.free(outputs) }
        try driver.launch(kernel, grid: gpu.grid(for: input.count), block: 256,
                          arguments: KernelArguments(inputs, outputs, UInt64(input.count)))
        try driver.synchronize(CUDAStream(rawValue: nil))   // the legacy stream the launch used, not the context (graph captures run beside)
        return try driver.read(Out.self, from: outputs, count: input.count)
    }

    /// Every special value, the neighbourhood of bf16/f16 rounding boundaries, and random bit patterns.
    static let floatPatterns: [UInt32] = {
        var patterns: [UInt32] = [0, 0x8000_0000, 0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0x7F80_0001, 0xFFFF_FFFF,
                                  0x477F_E000, 0x477F_EFFF, 0x477F_F000, 0x477F_F001, 0x3880_0000, 0x387F_FFFF,
                                  0x3300_0000, 0x3300_0001, 0x32FF_FFFF, 0x7F7F_FFFF, 0x0000_0001]
        for high in stride(from: UInt32(0), to: 0x1_0000, by: 1) {
            let base = high << 16
            patterns += [base | 0x7FFF, base | 0x8000, base | 0x8001]
        }
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<(1 << 18) { patterns.append(UInt32.random(in: 0...UInt32.max, using: &generator)) }
        return patterns
    }()

    @Test func bf16ToFloatMatchesForEveryPattern() throws {
        let all = (0...UInt16.max).map { $0 }
        let gpu = try Self.run("ep_selftest_bf16_to_float", all, as: UInt32.self)
        #expect(gpu == all.map { ElementConversion.bf16ToFloat($0).bitPattern })
    }

    @Test func floatToBF16RoundsLikeTheOracle() throws {
        let gpu = try Self.run("ep_selftest_float_to_bf16", Self.floatPatterns, as: UInt16.self)
        let cpu = Self.floatPatterns.map { ElementConversion.floatToBF16(Float(bitPattern: $0)) }
        let mismatches = zip(Self.floatPatterns, zip(gpu, cpu)).filter { $1.0 != $1.1 }
        #expect(mismatches.isEmpty, "first mismatches (input, gpu, cpu): \(mismatches.prefix(5))")
    }

    @Test func f16ToFloatMatchesForEveryPattern() throws {
        let all = (0...UInt16.max).map { $0 }
        let gpu = try Self.run("ep_selftest_f16_to_float", all, as: UInt32.self)
        let mismatches = zip(all, gpu).filter { input, output in
            let expected = ElementConversion.f16ToFloat(input)
            return expected.isNaN ? !Float(bitPattern: output).isNaN : expected.bitPattern != output
        }
        #expect(mismatches.isEmpty, "first mismatches (input, gpu): \(mismatches.prefix(5))")
    }

    @Test func floatToF16RoundsLikeTheOracle() throws {
        let gpu = try Self.run("ep_selftest_float_to_f16", Self.floatPatterns, as: UInt16.self)
        let mismatches = zip(Self.floatPatterns, gpu).filter { input, output in
            let value = Float(bitPattern: input)
            let expected = ElementConversion.floatToF16(value)
            return value.isNaN ? !Float16(bitPattern: output).isNaN : expected != output
        }
        #expect(mismatches.isEmpty, "first mismatches (input, gpu): \(mismatches.prefix(5))")
    }

    @Test func fusedMultiplyAddRoundsOnce() throws {
        let gpu = try GPU()
        let driver = gpu.driver
        let (module, kernel) = try gpu.kernel("ep_selftest_fma", in: KernelSource.embedded("ep_selftest"))
        defer { try? driver.unload(module) }
        let count = 1 << 16
        let weights = (0..<count).map { _ in Float.random(in: -2...2) }
        let xs = (0..<count).map { _ in Float.random(in: -1000...1000) }
        let accs = (0..<count).map { _ in Float.random(in: -1000...1000) }
        let pointers = try [weights, xs, accs].map { try gpu.upload($0) }
        let output = try driver.allocate(byteCount: count * 4)
        defer { pointers.forEach { try? driver.free($0) }; try? driver.free(output) }
        try driver.launch(kernel, grid: gpu.grid(for: count), block: 256,
                          arguments: KernelArguments(pointers[0], pointers[1], pointers[2], output, UInt64(count)))
        try driver.synchronize(CUDAStream(rawValue: nil))   // the legacy stream the launch used, not the context (graph captures run beside)
        let results = try driver.read(Float.self, from: output, count: count)
        let expected = (0..<count).map { accs[$0].addingProduct(weights[$0], xs[$0]) }
        #expect(results.map(\.bitPattern) == expected.map(\.bitPattern))
    }

    @Test func flagsPublishDataAndWaitsTimeOut() throws {
        let gpu = try GPU()
        let driver = gpu.driver
        let (module, kernel) = try gpu.kernel("ep_selftest_flags", in: KernelSource.embedded("ep_selftest"))
        defer { try? driver.unload(module) }
        let flags = try gpu.upload([UInt32](repeating: 0, count: 4))
        let payload = try gpu.upload([UInt32](repeating: 0, count: 2))
        let results = try gpu.upload([UInt32](repeating: 0xFFFF_FFFF, count: 8))
        defer { [flags, payload, results].forEach { try? driver.free($0) } }
        let timeoutNanoseconds: UInt64 = 2_000_000
        try driver.launch(kernel, grid: 2, block: 32,
                          arguments: KernelArguments(flags, payload, results, timeoutNanoseconds))
        try driver.synchronize(CUDAStream(rawValue: nil))   // the legacy stream the launch used, not the context (graph captures run beside)
        #expect(try driver.read(UInt32.self, from: results, count: 8) == [1, 1, 1, 1, 0, 1, 0, 5])
    }
}
