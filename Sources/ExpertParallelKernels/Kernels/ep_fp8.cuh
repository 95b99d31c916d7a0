// FP8 (OCP e4m3, `float8_e4m3fn`) with block scales, bit-identical to the CPU oracle
// (FP8E4M3 and FP8BlockScale in the ExpertParallel module; docs/fp8.md has the semantics).
//
// e4m3: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities; S.1111.111 is NaN;
// largest finite 448 (0x7E); subnormals mantissa × 2^-9.
// Conversion from float: round to nearest even, ±448 for anything beyond (±inf included), a
// zero result keeps the sign, every NaN gives 0x7F (one code whatever the sign, since a NaN's
// sign after x × multiplier is not the same on the CPU and the GPU).
//
// Scales, per block of 128 (or 32) elements of a row, from the block's amax = max |x| (fmaxf:
// NaN ignored), clamped to [1e-4, FLT_MAX]:
// - float32 mode: scale = amax / 448, multiplier = 448 / amax (each one IEEE division);
// - power-of-two modes (UE8M0 / E8M0): scale = 2^e with e the smallest integer such that
//   2^e >= the float amax / 448 (from its bits), stored as the byte e + 127; multiplier = 2^-e.
// An element is stored as e4m3(x × multiplier), the product rounded once to float.

// 1e-4f: the clamp below amax, so that an all-zero block has a finite scale.
#define EP_FP8_MIN_AMAX 1e-4f
// 448: the largest finite e4m3 value.
#define EP_FP8_MAX_FINITE 448.0f

// e4m3 from float by bit arithmetic. Used where the hardware conversion is missing (before
// sm_89), and by the GPU tests, which check it against the oracle beside the PTX path.
EP_DEVICE ep_u8 ep_fp8_e4m3_from_float_bits(float x) {
    const ep_u32 bits = __float_as_uint(x);
    const ep_u32 magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return 0x7fu;  // NaN, either sign
    const ep_u32 sign = (bits >> 24) & 0x80u;
    if (magnitude >= 0x43e00000u) return static_cast<ep_u8>(sign | 0x7eu);  // >= 448, inf: satfinite
    if (magnitude < 0x3c800000u) {
        // Below 2^-6, the smallest normal: the code is x × 2^9 rounded to an integer (0…8; 8 is
        // the code of 2^-6). x = significand × 2^(exponent - 150), so x × 2^9 is the 24-bit
        // significand shifted right by 141 - exponent (>= 21). From a shift of 25 on, x × 2^9 is
        // below one half and rounds to zero (float subnormals included).
        const ep_u32 shift = 141u - (magnitude >> 23);
        if (shift >= 25u) return static_cast<ep_u8>(sign);
        const ep_u32 significand = (magnitude & 0x7fffffu) | 0x800000u;
        ep_u32 result = significand >> shift;
        const ep_u32 remainder = significand & ((1u << shift) - 1u);
        const ep_u32 halfway = 1u << (shift - 1u);
        if (remainder > halfway || (remainder == halfway && (result & 1u))) result += 1u;
        return static_cast<ep_u8>(sign | result);
    }
    // Normal: rebias the exponent (127 → 7) and round away the low 20 mantissa bits to nearest
    // even; a carry moves into the exponent. Below 448 the result is at most 0x7E.
    const ep_u32 rebased = magnitude - 0x3c000000u;
    return static_cast<ep_u8>(sign | ((rebased + 0x7ffffu + ((rebased >> 20) & 1u)) >> 20));
}

// Two floats to e4m3, `hi` in bits 15…8 and `lo` in bits 7…0. On sm_89 and later this is the
// hardware conversion, PTX `cvt.rn.satfinite.e4m3x2.f32` (round to nearest even, saturating
// to ±MAX_NORM = ±448, inf included; NaN gives a NaN code); its NaN code is then made 0x7F, the
// oracle's one NaN code. Earlier architectures use the bit arithmetic above.
EP_DEVICE ep_u16 ep_fp8_e4m3x2_from_float(float hi, float lo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    ep_u16 packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
    if (hi != hi) packed = static_cast<ep_u16>((packed & 0x00ffu) | 0x7f00u);
    if (lo != lo) packed = static_cast<ep_u16>((packed & 0xff00u) | 0x007fu);
    return packed;
#else
    return static_cast<ep_u16>((ep_fp8_e4m3_from_float_bits(hi) << 8) | ep_fp8_e4m3_from_float_bits(lo));
#endif
}

EP_DEVICE ep_u8 ep_fp8_e4m3_from_float(float x) {
    return static_cast<ep_u8>(ep_fp8_e4m3x2_from_float(0.0f, x) & 0xffu);
}

// The exact float value of an e4m3 code; 0x7F and 0xFF give the quiet NaN 0x7FC00000.
EP_DEVICE float ep_fp8_e4m3_to_float(ep_u8 code) {
    const ep_u32 exponent = (code >> 3) & 0xfu;
    const ep_u32 mantissa = code & 0x7u;
    if (exponent == 0xfu && mantissa == 0x7u) return __uint_as_float(0x7fc00000u);
    const float magnitude = exponent == 0u
        ? static_cast<float>(mantissa) * 0.001953125f  // × 2^-9, exact
        : __uint_as_float(((exponent + 120u) << 23) | (mantissa << 20));
    return (code & 0x80u) ? -magnitude : magnitude;
}

// One lane's running amax: fmaxf ignores a NaN |x|, so NaN elements do not count.
EP_DEVICE float ep_fp8_lane_amax(float amax, float x) {
    return fmaxf(amax, fabsf(x));
}

// The amax of a block held by `lanes` consecutive lanes of a warp (a power of two, 1…32; each
// block's first lane a multiple of `lanes`): every lane gets its block's amax. Every lane of the
// warp must call it together. The maximum is exact, so the order of the reduction is free.
EP_DEVICE float ep_fp8_group_amax(float lane_amax, ep_u32 lanes) {
    for (ep_u32 offset = lanes >> 1; offset > 0u; offset >>= 1) {
        lane_amax = fmaxf(lane_amax, __shfl_xor_sync(0xffffffffu, lane_amax, offset));
    }
    return lane_amax;
}

struct ep_fp8_scale {
    float scale;             // decoded element × scale = dequantised value
    float multiplier;        // x × multiplier is converted to e4m3
    ep_u32 exponent_byte;    // e + 127 in the power-of-two modes, 0 in float32 mode
};

// The scale of a block from its amax (unclamped; a block with inf counts as FLT_MAX).
EP_DEVICE ep_fp8_scale ep_fp8_block_scale(float amax, bool power_of_two) {
    const float clamped = fminf(fmaxf(amax, EP_FP8_MIN_AMAX), __uint_as_float(0x7f7fffffu));
    ep_fp8_scale s;
    if (!power_of_two) {
        s.scale = __fdiv_rn(clamped, EP_FP8_MAX_FINITE);
        s.multiplier = __fdiv_rn(EP_FP8_MAX_FINITE, clamped);
        s.exponent_byte = 0u;
        return s;
    }
    // clamped / 448 is a positive normal float: its biased exponent, plus one when a mantissa
    // bit is set, is ceil(log2) + 127 (105…247, so 254 - byte is a normal exponent too).
    const ep_u32 bits = __float_as_uint(__fdiv_rn(clamped, EP_FP8_MAX_FINITE));
    const ep_u32 byte = (bits >> 23) + ((bits & 0x7fffffu) != 0u ? 1u : 0u);
    s.scale = __uint_as_float(byte << 23);
    s.multiplier = __uint_as_float((254u - byte) << 23);
    s.exponent_byte = byte;
    return s;
}

// One element of a block: e4m3(x × multiplier), the product rounded once (no contraction).
EP_DEVICE ep_u8 ep_fp8_quantize(float x, ep_fp8_scale s) {
    return ep_fp8_e4m3_from_float(__fmul_rn(x, s.multiplier));
}

// Two elements at once (`hi` in bits 15…8), for packed stores.
EP_DEVICE ep_u16 ep_fp8_quantize2(float hi, float lo, ep_fp8_scale s) {
    return ep_fp8_e4m3x2_from_float(__fmul_rn(hi, s.multiplier), __fmul_rn(lo, s.multiplier));
}

// decode(code) × scale, one rounding: what the CPU oracle's dequantisation gives.
EP_DEVICE float ep_fp8_dequantize(ep_u8 code, float scale) {
    return __fmul_rn(ep_fp8_e4m3_to_float(code), scale);
}

// The scale of a UE8M0/E8M0 byte: 2^(byte - 127) (0xFF is NaN in E8M0, 0 is 2^-127).
EP_DEVICE float ep_fp8_scale_from_byte(ep_u8 byte) {
    if (byte == 0xffu) return __uint_as_float(0x7fc00000u);
    if (byte == 0u) return __uint_as_float(0x00400000u);
    return __uint_as_float(static_cast<ep_u32>(byte) << 23);
}
