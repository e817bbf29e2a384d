/* float16 <-> float32 conversions on the bits, in portable C (no F16C): float16 ->
   float32 is exact; float32 -> float16 rounds to nearest, ties to even, with
   overflow to +-inf, gradual underflow to subnormals and NaN kept NaN, bit for bit
   what numpy's astype(np.float16) gives (numpy's npy_floatbits_to_halfbits).
   Used by _f16.pyx (the row conversions) and _simd_half.h (the float16 pooling's
   fallback where the CPU lacks F16C, and its column tails). */
#ifndef SPARSEMBED_HALF_H
#define SPARSEMBED_HALF_H

#include <stdint.h>
#include <string.h>

static inline float sparsembed_h2f(uint16_t h) {
    /* exact; branch-light (F. Giesen's half_to_float_fast4) */
    const uint32_t shifted_exp = 0x7c00u << 13;
    const uint32_t magic_bits = 113u << 23;    /* 2**-14 */
    uint32_t o = ((uint32_t)(h & 0x7fffu)) << 13;
    uint32_t exp = shifted_exp & o;
    float f, magic;
    o += (127u - 15u) << 23;
    if (exp == shifted_exp) {                  /* inf, NaN */
        o += (128u - 16u) << 23;
    } else if (exp == 0) {                     /* zero, subnormal: renormalise */
        o += 1u << 23;
        memcpy(&f, &o, 4);
        memcpy(&magic, &magic_bits, 4);
        f -= magic;                            /* exact, no float32 subnormal */
        memcpy(&o, &f, 4);
    }
    o |= ((uint32_t)(h & 0x8000u)) << 16;
    memcpy(&f, &o, 4);
    return f;
}

static inline uint16_t sparsembed_f2h(float value) {
    uint32_t f, f_exp, f_sig;
    uint16_t h_sgn, h_exp, h_sig, ret;
    memcpy(&f, &value, 4);
    h_sgn = (uint16_t)((f & 0x80000000u) >> 16);
    f_exp = f & 0x7f800000u;
    if (f_exp >= 0x47800000u) {              /* overflow, inf, NaN */
        if (f_exp == 0x7f800000u) {
            f_sig = f & 0x007fffffu;
            if (f_sig != 0) {
                ret = (uint16_t)(0x7c00u + (f_sig >> 13));
                if (ret == 0x7c00u) {
                    ret++;                   /* stays a NaN */
                }
                return (uint16_t)(h_sgn + ret);
            }
        }
        return (uint16_t)(h_sgn + 0x7c00u);
    }
    if (f_exp <= 0x38000000u) {              /* subnormal half or signed zero */
        if (f_exp < 0x33000000u) {
            return h_sgn;
        }
        f_exp >>= 23;
        f_sig = 0x00800000u + (f & 0x007fffffu);
        f_sig >>= (113 - f_exp);
        /* round half to even; the shift may have dropped sticky bits */
        if (((f_sig & 0x00003fffu) != 0x00001000u) || (f & 0x000007ffu)) {
            f_sig += 0x00001000u;
        }
        h_sig = (uint16_t)(f_sig >> 13);
        return (uint16_t)(h_sgn + h_sig);
    }
    h_exp = (uint16_t)((f_exp - 0x38000000u) >> 13);
    f_sig = f & 0x007fffffu;
    if ((f_sig & 0x00003fffu) != 0x00001000u) {
        f_sig += 0x00001000u;
    }
    h_sig = (uint16_t)(f_sig >> 13);
    /* a carry out of the significand bumps the exponent (up to inf): correct */
    return (uint16_t)(h_sgn + h_exp + h_sig);
}

#endif
