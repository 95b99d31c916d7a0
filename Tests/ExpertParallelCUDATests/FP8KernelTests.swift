import ExpertParallel
import ExpertParallelCUDA
import ExpertParallelKernels
import Foundation
import Testing

/// Kernels that run the `ep_fp8.cuh` helpers, so that the GPU tests compare them with the CPU
/// oracle (`FP8E4M3`, `FP8RowFormat`). `by_bits` picks the bit-arithmetic conversion in place of
/// the hardware one (`cvt.rn.satfinite.e4m3x2.f32` on sm_89 and later).
enum FP8TestKernels {
    static let source = KernelSource(name: "ep_fp8_test", body: #"""
        EP_DEVICE ep_u8 ep_fp8_test_convert(float x, ep_u32 by_bits) {
            return by_bits ? ep_fp8_e4m3_from_float_bits(x) : ep_fp8_e4m3_from_float(x);
        }

        extern "C" __global__ void ep_fp8_test_encode(const float* in, ep_u8* out, ep_u64 count, ep_u32 by_bits) {
            for (ep_u64 i = ep_grid_thread(); i < count; i += ep_grid_threads()) out[i] = ep_fp8_test_convert(in[i], by_bits);
        }

        // out[i] packs in[2i + 1] (high byte) and in[2i] (low byte): bytes in input order.
        extern "C" __global__ void ep_fp8_test_encode_pairs(const float* in, ep_u16* out, ep_u64 pairs) {
            for (ep_u64 i = ep_grid_thread(); i < pairs; i += ep_grid_threads()) {
                out[i] = ep_fp8_e4m3x2_from_float(in[2 * i + 1], in[2 * i]);
            }
        }

        extern "C" __global__ void ep_fp8_test_decode(const ep_u8* in, float* out, ep_u64 count) {
            for (ep_u64 i = ep_grid_thread(); i < count; i += ep_grid_threads()) out[i] = ep_fp8_e4m3_to_float(in[i]);
        }

        // One warp per 128 elements of a row, 4 consecutive elements a lane, so a block of
        // `block_size` elements is block_size / 4 lanes. Scales as FP8RowFormat stores them:
        // float32 words, or exponent bytes packed 4 to a word with zero padding.
        extern "C" __global__ void ep_fp8_test_quantize(const float* rows, ep_u8* codes, ep_u32* scale_words,
                                                        ep_u64 row_count, ep_u32 hidden, ep_u32 block_size,
                                                        ep_u32 power_of_two, ep_u32 by_bits) {
            const ep_u32 lane = threadIdx.x & 31u;
            const ep_u64 chunks_per_row = (hidden + 127u) / 128u;
            const ep_u64 blocks_per_row = hidden / block_size;
            const ep_u64 words_per_row = power_of_two ? (blocks_per_row + 3u) / 4u : blocks_per_row;
            for (ep_u64 chunk = ep_grid_thread() / 32u; chunk < row_count * chunks_per_row; chunk += ep_grid_threads() / 32u) {
                const ep_u64 row = chunk / chunks_per_row;
                const ep_u32 first = static_cast<ep_u32>(chunk % chunks_per_row) * 128u + lane * 4u;
                const bool inside = first < hidden;
                float x[4];
                float amax = 0.0f;
                for (int k = 0; k < 4; ++k) {
                    x[k] = inside ? rows[row * hidden + first + k] : 0.0f;
                    amax = ep_fp8_lane_amax(amax, x[k]);
                }
                amax = ep_fp8_group_amax(amax, block_size / 4u);  // every lane of the warp takes part
                const ep_fp8_scale s = ep_fp8_block_scale(amax, power_of_two != 0u);
                ep_u8* out = codes + row * hidden + first;
                ep_u8* row_scale_bytes = reinterpret_cast<ep_u8*>(scale_words + row * words_per_row);
                if (inside) {
                    if (by_bits) {
                        for (int k = 0; k < 4; ++k) out[k] = ep_fp8_e4m3_from_float_bits(__fmul_rn(x[k], s.multiplier));
                    } else {
                        const ep_u16 low = ep_fp8_quantize2(x[1], x[0], s);
                        out[0] = static_cast<ep_u8>(low & 0xffu);
                        out[1] = static_cast<ep_u8>(low >> 8);
                        out[2] = ep_fp8_quantize(x[2], s);
                        out[3] = ep_fp8_quantize(x[3], s);
                    }
                    if (first % block_size == 0u) {
                        const ep_u32 block = first / block_size;
                        if (power_of_two) {
                            row_scale_bytes[block] = static_cast<ep_u8>(s.exponent_byte);
                        } else {
                            scale_words[row * words_per_row + block] = __float_as_uint(s.scale);
                        }
                    }
                }
                if (power_of_two && lane == 0u && chunk % chunks_per_row == chunks_per_row - 1u) {
                    for (ep_u64 j = blocks_per_row; j < words_per_row * 4u; ++j) row_scale_bytes[j] = 0u;
                }
            }
        }
        """#)
}

@Suite("FP8 helpers compile with NVRTC", .enabled(if: TestEnvironment.runsNVRTCTests, "needs NVRTC (EP_REQUIRE_NVRTC=1 to require it)"))
struct FP8KernelCompileTests {
    @Test("the FP8 test kernels compile to CUBIN", arguments: [GPUArch.hopper, "sm_89", "sm_80"])
    func compiles(arch: GPUArch) throws {
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let kernel = try compiler.compile(FP8TestKernels.source, arch: arch)
        #expect(kernel.image.starts(with: [0x7F, 0x45, 0x4C, 0x46]), "a CUBIN is an ELF file")
    }

    @Test("sm_89 and later convert with cvt.rn.satfinite.e4m3x2.f32, earlier ones by bit arithmetic",
          arguments: [("compute_90a", true), ("compute_89", true), ("compute_80", false)] as [(GPUArch, Bool)])
    func hardwareConversionWhereItExists(arch: GPUArch, usesHardware: Bool) throws {
        let compiler = KernelCompiler(nvrtc: try NVRTCLibrary.shared(), cache: nil)
        let kernel = try compiler.compile(FP8TestKernels.source, arch: arch)
        let ptx = String(decoding: kernel.image.dropLast(), as: UTF8.self)
        #expect(ptx.contains(".entry ep_fp8_test_quantize"))
        #expect(ptx.contains("cvt.rn.satfinite.e4m3x2.f32") == usesHardware)
    }
}

@Suite("FP8 helpers on the GPU match the CPU oracle", .serialized, .enabled(if: TestEnvironment.runsGPUTests, "EP_GPU_TESTS=1 runs GPU tests"))
struct FP8KernelTests {
    /// Runs an elementwise test kernel of shape (in, out, count[, by_bits]) over `input`.
    static func run<In: BitwiseCopyable, Out: BitwiseCopyable>(
        _ name: String, _ input: [In], count: Int, as: Out.Type, byBits: Bool? = nil
    ) throws -> [Out] {
        let gpu = try GPU()
        let driver = gpu.driver
        let (module, kernel) = try gpu.kernel(name, in: FP8TestKernels.source)
        defer { try? driver.unload(module) }
        let inputs = try gpu.upload(input)
        let outputs = try driver.allocate(byteCount: max(1, count * MemoryLayout<Out>.stride))
        defer { try? driver.free(inputs); try? driver.free(outputs) }
        let arguments = KernelArguments(inputs, outputs, UInt64(count))
        if let byBits { arguments.append(UInt32(byBits ? 1 : 0)) }
        try driver.launch(kernel, grid: gpu.grid(for: count), block: 256, arguments: arguments)
        try driver.synchronize(CUDAStream(rawValue: nil))   // the legacy stream the launch used
        return try driver.read(Out.self, from: outputs, count: count)
    }

    /// Special values, both sides of every e4m3 midpoint, every float's top 16 bits with the low
    /// bits at their edges, and random bit patterns.
    static let floatPatterns: [UInt32] = {
        var patterns: [UInt32] = [0, 0x8000_0000, 0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0xFFC0_0000, 0x7F80_0001,
                                  0xFFFF_FFFF, 0x0000_0001, 0x8000_0001, 0x7F7F_FFFF, 0xFF7F_FFFF]
        for code in 0..<0x7E {
            let mid = (Double(FP8E4M3.decode(UInt8(code))) + Double(FP8E4M3.decode(UInt8(code + 1)))) / 2
            for delta in -2...2 {
                let bits = UInt32(Int(Float(mid).bitPattern) + delta)
                patterns += [bits, bits | 0x8000_0000]
            }
        }
        for high in UInt32(0)...0xFFFF {
            for low: UInt32 in [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] { patterns.append(high << 16 | low) }
        }
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<(1 << 18) { patterns.append(UInt32.random(in: 0...UInt32.max, using: &generator)) }
        return patterns
    }()

    @Test("float → e4m3 gives the oracle's code for every pattern", arguments: [false, true])
    func encodeMatchesTheOracle(byBits: Bool) throws {
        let gpu = try Self.run("ep_fp8_test_encode", Self.floatPatterns, count: Self.floatPatterns.count, as: UInt8.self, byBits: byBits)
        let cpu = Self.floatPatterns.map { FP8E4M3.encode(Float(bitPattern: $0)) }
        let mismatches = zip(Self.floatPatterns, zip(gpu, cpu)).filter { $1.0 != $1.1 }
        #expect(mismatches.isEmpty, "first mismatches (input, (gpu, cpu)): \(mismatches.prefix(8))")
    }

    @Test func pairConversionPacksTheFirstValueInTheLowByte() throws {
        let values = Self.floatPatterns.prefix(1 << 16).map { Float(bitPattern: $0) }
        let gpu = try Self.run("ep_fp8_test_encode_pairs", values, count: values.count / 2, as: UInt16.self)
        let cpu = (0..<values.count / 2).map {
            UInt16(FP8E4M3.encode(values[2 * $0 + 1])) << 8 | UInt16(FP8E4M3.encode(values[2 * $0]))
        }
        #expect(gpu == cpu)
    }

    @Test func decodeIsExactForEveryCode() throws {
        let codes = (0...255).map(UInt8.init)
        let gpu = try Self.run("ep_fp8_test_decode", codes, count: codes.count, as: UInt32.self)
        #expect(gpu == codes.map { FP8E4M3.decode($0).bitPattern })
    }

    /// Quantises `rows` on the GPU; codes and scale buffers start as 0xAB so that a byte left
    /// unwritten (a padding byte included) shows.
    static func quantize(_ rows: [[Float]], _ format: FP8RowFormat, byBits: Bool) throws -> [FP8QuantizedRow] {
        let gpu = try GPU()
        let driver = gpu.driver
        let (module, kernel) = try gpu.kernel("ep_fp8_test_quantize", in: FP8TestKernels.source)
        defer { try? driver.unload(module) }
        let hidden = format.hidden, words = format.scaleWordsPerRow
        let input = try gpu.upload(rows.flatMap { $0 })
        let codes = try driver.allocate(byteCount: rows.count * hidden)
        let scales = try driver.allocate(byteCount: rows.count * words * 4)
        defer { try? driver.free(input); try? driver.free(codes); try? driver.free(scales) }
        try driver.fill(codes, byte: 0xAB, byteCount: rows.count * hidden)
        try driver.fill(scales, byte: 0xAB, byteCount: rows.count * words * 4)
        let warps = rows.count * ((hidden + 127) / 128)
        let grid = LaunchDimensions(x: UInt32(max(1, min((warps + 7) / 8, gpu.multiprocessors * 8))))
        let arguments = KernelArguments(
            input, codes, scales, UInt64(rows.count), UInt32(hidden), UInt32(format.mode.blockSize),
            UInt32(format.mode.isPowerOfTwo ? 1 : 0), UInt32(byBits ? 1 : 0))
        try driver.launch(kernel, grid: grid, block: 256, arguments: arguments)
        try driver.synchronize(CUDAStream(rawValue: nil))   // the legacy stream the launch used
        let codeBytes = try driver.read(UInt8.self, from: codes, count: rows.count * hidden)
        let scaleWords = try driver.read(Int32.self, from: scales, count: rows.count * words)
        return rows.indices.map {
            FP8QuantizedRow(codes: Array(codeBytes[$0 * hidden..<($0 + 1) * hidden]),
                            scaleWords: Array(scaleWords[$0 * words..<($0 + 1) * words]))
        }
    }

    /// Blocks that pin the edges: all zeros (the amax clamp), equal values, amax 448 (multiplier
    /// 1, so e4m3 ties reach the conversion unchanged), NaN and infinities, tiny values.
    static func edgeRows(_ format: FP8RowFormat) -> [[Float]] {
        let size = format.mode.blockSize
        let tiny = Float(sign: .plus, exponent: -10, significand: 1)
        let ties: [Float] = [448, 1.0625, 1.1875, 248, 432, -432, -1.0625, tiny, -tiny, 3 * tiny, 15 * tiny, -0.0]
        let specials: [Float] = [.nan, -.nan, Float(bitPattern: 0x7F80_0001), .infinity, -.infinity, 1, -0.0,
                                 .leastNonzeroMagnitude, -.leastNonzeroMagnitude, 1e-30]
        let blocks: [[Float]] = [
            [Float](repeating: 0, count: size),
            [Float](repeating: 3, count: size),
            (0..<size).map { ties[$0 % ties.count] },
            (0..<size).map { specials[$0 % specials.count] },
            (0..<size).map { Float($0 + 1) * 1e-7 * ($0 % 2 == 0 ? 1 : -1) },
        ]
        return blocks.indices.map { first in
            (0..<format.blocksPerRow).flatMap { blocks[(first + $0) % blocks.count] }
        }
    }

    static func randomRows(_ format: FP8RowFormat, count: Int) -> [[Float]] {
        var generator = SystemRandomNumberGenerator()
        return (0..<count).map { _ in
            (0..<format.blocksPerRow).flatMap { _ in
                let exponent = Float.random(in: -24...24, using: &generator)
                return (0..<format.mode.blockSize).map { _ in
                    let magnitude = Float(pow(2.0, Double(exponent + Float.random(in: -12...2, using: &generator))))
                    return Bool.random(using: &generator) ? magnitude : -magnitude
                }
            }
        }
    }

    @Test("rows quantised on the GPU equal the oracle's codes and scale words",
          arguments: FP8ScaleMode.allCases, [false, true])
    func quantizedRowsMatchTheOracle(mode: FP8ScaleMode, byBits: Bool) throws {
        // 5 blocks leave padding bytes in the packed modes; 7168 is DeepSeek's hidden size.
        for hidden in [5 * mode.blockSize, 7168] {
            let format = try FP8RowFormat(mode: mode, hidden: hidden)
            let rows = Self.edgeRows(format) + Self.randomRows(format, count: 64)
            let gpu = try Self.quantize(rows, format, byBits: byBits)
            for (index, row) in rows.enumerated() {
                let cpu = try format.quantize(row)
                let element = gpu[index].codes.indices.first { gpu[index].codes[$0] != cpu.codes[$0] }
                #expect(gpu[index].scaleWords == cpu.scaleWords, "hidden \(hidden), row \(index): scale words")
                #expect(element == nil, "hidden \(hidden), row \(index), element \(element ?? -1): input \(element.map { row[$0] } ?? 0)")
            }
        }
    }
}
