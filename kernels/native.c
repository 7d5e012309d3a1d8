#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define C1 0x9E3779B1u
#define C2 0x85EBCA6Bu

/* kernels.rng.uniform of index base + j: u = (h >>> 8) 2^-24, h = fmix(key, index); uint32 arithmetic wraps as
   torch's int32 does. (base + j + k0) C1 = t0 + j C1 with t0 = (base + k0) C1. */
static inline float uniform24(uint32_t t0, uint32_t j, uint32_t k1) {
    uint32_t t = (t0 + j * C1) ^ k1;
    uint32_t h = (t ^ (t >> 16)) * C2;
    return (float)(int32_t)(h >> 8) * 0x1p-24f;
}

/* absmax over a block as the largest |x| bit pattern: for non-negative floats integer order is float order */
static inline float block_absmax(const float *x, int64_t b) {
    uint32_t m = 0;
    for (int64_t j = 0; j < b; j++) {
        uint32_t u; memcpy(&u, x + j, 4);
        u &= 0x7FFFFFFFu;
        m = u > m ? u : m;
    }
    float f; memcpy(&f, &m, 4);
    return f;
}

static inline float block_inv(float absmax, float L) {
    float inv = (1.0f / absmax) * L;
    return inv < INFINITY ? inv : 0.0f;
}

static inline float clampf(float v, float L) {
    v = v > -L ? v : -L;
    return v < L ? v : L;
}

/* q[j] = clamp(floor(xr[j] inv + u(base + j)), -L, L) (stochastic) or clamp(rint(xr[j] inv), -L, L) for j in [0, m),
   and where rr is not NULL the residual rr[j] = xr[j] - q[j] sc (as the reference computes it: the decode q * s
   from the integer, then the difference; v + 0.0f is the integer's float: +0 for a rounded -0.0, which gcc with
   -fno-trapping-math would otherwise keep by folding (float)(int)v back to v). With AVX-512, 16 elements at a time
   in the same float32 operations (x86 max/min(v, c) are v > c ? v : c and v < c ? v : c, as clampf; the hash's
   index is an induction vector stepped by 16 C1); the scalar loop takes the tail, and all of it elsewhere. */
#ifdef __AVX512F__
/* the hash's index term (base + j + k0) C1 for lanes j = 0..15 of a run starting at t0 = (base + k0) C1 */
static inline __m512i hash_index16(uint32_t t0) {
    return _mm512_add_epi32(_mm512_set1_epi32((int)t0), _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)C1)));
}

/* 16 elements' clamp(floor(x inv + u), -L, L) (stochastic; *tv then steps by 16 C1) or clamp(rint(x inv), -L, L) */
static inline __attribute__((always_inline)) __m512 quant16(__m512 xv, float inv, float L, int stochastic,
                                                            __m512i *tv, uint32_t k1) {
    __m512 v = _mm512_mul_ps(xv, _mm512_set1_ps(inv));
    if (stochastic) {
        __m512i t = _mm512_xor_si512(*tv, _mm512_set1_epi32((int)k1));
        __m512i h = _mm512_mullo_epi32(_mm512_xor_si512(t, _mm512_srli_epi32(t, 16)), _mm512_set1_epi32((int)C2));
        v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), _mm512_set1_ps(0x1p-24f)));
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        *tv = _mm512_add_epi32(*tv, _mm512_set1_epi32((int)(16u * C1)));
    } else {
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    return _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-L)), _mm512_set1_ps(L));
}

/* x - q sc for 16 elements, q the float integers of quant16 (+ 0: a rounded -0.0 decodes as +0) */
static inline __m512 resid16(__m512 xv, __m512 v, float sc) {
    return _mm512_sub_ps(xv, _mm512_mul_ps(_mm512_add_ps(v, _mm512_setzero_ps()), _mm512_set1_ps(sc)));
}
#endif

static inline __attribute__((always_inline)) void quant_run_(const float *restrict xr, int64_t m, float inv, float L,
        float sc, int stochastic, uint32_t base, uint32_t k0, uint32_t k1, int8_t *restrict q, float *restrict rr) {
    uint32_t t0 = (base + k0) * C1;
    int64_t j = 0;
#ifdef __AVX512F__
    __m512i tv = hash_index16(t0);
    for (; j + 16 <= m; j += 16) {
        __m512 xv = _mm512_loadu_ps(xr + j), v = quant16(xv, inv, L, stochastic, &tv, k1);
        _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)));
        if (rr) _mm512_storeu_ps(rr + j, resid16(xv, v, sc));
    }
#endif
    for (; j < m; j++) {
        float v = clampf(stochastic ? floorf(xr[j] * inv + uniform24(t0, (uint32_t)j, k1)) : rintf(xr[j] * inv), L);
        q[j] = (int8_t)(int32_t)v;
        if (rr) rr[j] = xr[j] - (v + 0.0f) * sc;
    }
}

/* quant_run_ with the two flags as constants: four loops without a test inside */
static inline __attribute__((always_inline)) void quant_run(const float *restrict xr, int64_t m, float inv, float L,
        float sc, int stochastic, uint32_t base, uint32_t k0, uint32_t k1, int8_t *restrict q, float *restrict rr) {
    if (stochastic && rr) quant_run_(xr, m, inv, L, sc, 1, base, k0, k1, q, rr);
    else if (stochastic) quant_run_(xr, m, inv, L, sc, 1, base, k0, k1, q, NULL);
    else if (rr) quant_run_(xr, m, inv, L, sc, 0, base, k0, k1, q, rr);
    else quant_run_(xr, m, inv, L, sc, 0, base, k0, k1, q, NULL);
}

static inline __attribute__((always_inline)) void quantize8_block(const float *restrict x, int64_t t, float L,
        int stochastic, uint32_t base, uint32_t k0, uint32_t k1, int8_t *restrict q, float *restrict s,
        float *restrict res) {
    float absmax = block_absmax(x, t), sc = absmax / L;
    quant_run(x, t, block_inv(absmax, L), L, sc, stochastic, base, k0, k1, q, res);
    *s = sc;
}

/* quantize_blockwise: n elements in blocks of b (the last may be short) -> q int8 (n,), s (ceil(n / b),) and, if
   res is not NULL, res = x - D(q, s) (n,); each block is read once for its absmax, then quantised from L1. The
   common block sizes get loops of constant length. */
void ft_quantize8(const float *restrict x, int64_t n, int64_t b, float L, int stochastic, int32_t key0,
                  int32_t key1, int8_t *restrict q, float *restrict s, float *restrict res) {
    uint32_t k0 = (uint32_t)key0, k1 = (uint32_t)key1;
    int64_t full = n / b, r = 0;
#define FULL_ROWS8(B) for (; r < full; r++) quantize8_block(x + r * (B), (B), L, stochastic, (uint32_t)(r * (B)), \
                                                        k0, k1, q + r * (B), s + r, res ? res + r * (B) : NULL)
    if (b == 256) FULL_ROWS8(256);
    else if (b == 512) FULL_ROWS8(512);
    else if (b == 128) FULL_ROWS8(128);
    else FULL_ROWS8(b);
    if (full * b < n) quantize8_block(x + full * b, n - full * b, L, stochastic, (uint32_t)(full * b), k0, k1,
                                      q + full * b, s + full, res ? res + full * b : NULL);
}

static inline __attribute__((always_inline)) void encode4_block_(const float *restrict xrow, int64_t t, float L,
        int stochastic, uint32_t base, uint32_t k0, uint32_t k1, uint8_t *restrict cr, float *restrict s,
        float *restrict rrow) {
    int64_t h = (t + 1) / 2;
    float absmax = block_absmax(xrow, t), inv = block_inv(absmax, L), sc = absmax / L;
#ifdef __AVX512F__
    if (t % 32 == 0) {               /* both halves whole vectors: quantise 16 + 16 and pack them in registers */
        __m512i tl = hash_index16((base + k0) * C1), th = hash_index16((base + (uint32_t)h + k0) * C1);
        const __m512i nib = _mm512_set1_epi32(15);
        for (int64_t j = 0; j < h; j += 16) {
            __m512 xl = _mm512_loadu_ps(xrow + j), xh = _mm512_loadu_ps(xrow + h + j);
            __m512 vl = quant16(xl, inv, L, stochastic, &tl, k1), vh = quant16(xh, inv, L, stochastic, &th, k1);
            __m512i b = _mm512_or_si512(_mm512_and_si512(_mm512_cvttps_epi32(vl), nib),
                                        _mm512_slli_epi32(_mm512_and_si512(_mm512_cvttps_epi32(vh), nib), 4));
            _mm_storeu_si128((__m128i *)(cr + j), _mm512_cvtepi32_epi8(b));
            if (rrow) {
                _mm512_storeu_ps(rrow + j, resid16(xl, vl, sc));
                _mm512_storeu_ps(rrow + h + j, resid16(xh, vh, sc));
            }
        }
        *s = sc;
        return;
    }
#endif
    int8_t lo[2048], hi[2048];
    for (int64_t c = 0; c < h; c += 2048) {
        int64_t m = h - c < 2048 ? h - c : 2048, mh = t - h - c < m ? t - h - c : m;
        quant_run(xrow + c, m, inv, L, sc, stochastic, base + (uint32_t)c, k0, k1, lo, rrow ? rrow + c : NULL);
        quant_run(xrow + c + h, mh, inv, L, sc, stochastic, base + (uint32_t)(c + h), k0, k1, hi,
                  rrow ? rrow + c + h : NULL);
        for (int64_t j = mh; j < m; j++) hi[j] = 0;
        for (int64_t j = 0; j < m; j++) cr[c + j] = (uint8_t)((lo[j] & 15) | ((hi[j] & 15) << 4));
    }
    *s = sc;
}

/* one block of t elements at index base of encode_blockwise(bits=4): byte j holds element j (low nibble) and
   j + ceil(t/2) (high; 0 past the end). With AVX-512 and t a multiple of 32 the halves are quantised 16 + 16 at a
   time and packed in registers; otherwise each half's q is staged in 2048-byte pieces (L1). The flags are made
   constants, as for quant_run. */
static inline __attribute__((always_inline)) void encode4_block(const float *restrict xrow, int64_t t, float L,
        int stochastic, uint32_t base, uint32_t k0, uint32_t k1, uint8_t *restrict cr, float *restrict s,
        float *restrict rrow) {
    if (stochastic && rrow) encode4_block_(xrow, t, L, 1, base, k0, k1, cr, s, rrow);
    else if (stochastic) encode4_block_(xrow, t, L, 1, base, k0, k1, cr, s, NULL);
    else if (rrow) encode4_block_(xrow, t, L, 0, base, k0, k1, cr, s, rrow);
    else encode4_block_(xrow, t, L, 0, base, k0, k1, cr, s, NULL);
}

/* encode_blockwise(bits=4), b even: n elements in blocks of b (the last may be short) -> codes (ceil(n / 2),),
   s (ceil(n / b),) and res as ft_quantize8's */
void ft_encode4(const float *restrict x, int64_t n, int64_t b, float L, int stochastic, int32_t key0,
                int32_t key1, uint8_t *restrict codes, float *restrict s, float *restrict res) {
    uint32_t k0 = (uint32_t)key0, k1 = (uint32_t)key1;
    int64_t full = n / b, r = 0;
#define FULL_ROWS4(B) for (; r < full; r++) encode4_block(x + r * (B), (B), L, stochastic, (uint32_t)(r * (B)), \
                                                      k0, k1, codes + r * ((B) / 2), s + r, res ? res + r * (B) : NULL)
    if (b == 256) FULL_ROWS4(256);
    else if (b == 512) FULL_ROWS4(512);
    else if (b == 128) FULL_ROWS4(128);
    else FULL_ROWS4(b);
    if (full * b < n) encode4_block(x + full * b, n - full * b, L, stochastic, (uint32_t)(full * b), k0, k1,
                                    codes + full * (b / 2), s + full, res ? res + full * b : NULL);
}

void ft_dequantize8(const int8_t *restrict q, const float *restrict s, int64_t n, int64_t b, float *restrict out) {
    for (int64_t r = 0; r * b < n; r++) {
        int64_t t = n - r * b < b ? n - r * b : b;
        float sr = s[r];
        for (int64_t j = 0; j < t; j++) out[r * b + j] = (float)q[r * b + j] * sr;
    }
}

void ft_decode4(const uint8_t *restrict codes, const float *restrict s, int64_t n, int64_t b, float *restrict out) {
    for (int64_t r = 0; r * b < n; r++) {
        int64_t t = n - r * b < b ? n - r * b : b, h = (t + 1) / 2;
        float sr = s[r];
        const uint8_t *restrict cr = codes + r * (b / 2);
        float *restrict o = out + r * b;
        for (int64_t j = 0; j < t - h; j++) {
            int32_t c = cr[j];
            o[j] = (float)(((c & 15) ^ 8) - 8) * sr;
            o[j + h] = (float)(((c >> 4) ^ 8) - 8) * sr;
        }
        if (t - h < h) o[h - 1] = (float)(((cr[h - 1] & 15) ^ 8) - 8) * sr;          /* odd t: the last low nibble */
    }
}

/* pack_signs: bit j of byte i = (x[8 i + j] >= 0), m whole bytes */
void ft_pack_signs(const float *x, int64_t m, uint8_t *out) {
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 2 <= m; i += 2) {                                  /* one compare mask = two bytes, LSB first */
        uint16_t k = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + 8 * i), _mm512_setzero_ps(), _CMP_GE_OQ);
        memcpy(out + i, &k, 2);
    }
#endif
    for (; i < m; i++) {
        uint32_t acc = 0;
        for (int j = 0; j < 8; j++) acc |= (uint32_t)(x[8 * i + j] >= 0.0f) << j;
        out[i] = (uint8_t)acc;
    }
}

/* encode_signs: ft_pack_signs of the first 8 floor(n / 8) elements and l1[0] = sum |x_i| over all n in float64,
   in a fixed order (kernels.bitpack._encode_signs_reference): lane l = i mod 16 adds its elements in ascending i,
   then lanes 0..15 are added in order. */
void ft_encode_signs(const float *restrict x, int64_t n, uint8_t *restrict out, double *restrict l1) {
    double lane[16] = {0};
    int64_t i = 0;
#ifdef __AVX512F__
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        uint16_t k = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ);
        memcpy(out + i / 8, &k, 2);
        v = _mm512_abs_ps(v);
        a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
        a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    }
    _mm512_storeu_pd(lane, a0);
    _mm512_storeu_pd(lane + 8, a1);
#endif
    ft_pack_signs(x + i, n / 8 - i / 8, out + i / 8);
    for (; i < n; i += 16)
        for (int l = 0; l < 16 && i + l < n; l++) lane[l] += (double)fabsf(x[i + l]);
    double total = 0.0;
    for (int l = 0; l < 16; l++) total += lane[l];
    *l1 = total;
}

/* unpack_signs with a scale: +s where the bit is set, -s where clear, 8 m floats (AVX-512: a masked blend per two
   bytes; elsewhere each byte copies its row of a 256 x 8 table of +-s, 8 KiB, in L1) */
void ft_unpack_signs(const uint8_t *restrict packed, int64_t m, float s, float *restrict out) {
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 pos = _mm512_set1_ps(s), neg = _mm512_set1_ps(-s);
    for (; i + 2 <= m; i += 2) {
        uint16_t k;
        memcpy(&k, packed + i, 2);
        _mm512_storeu_ps(out + 8 * i, _mm512_mask_blend_ps(k, neg, pos));
    }
#endif
    float table[256 * 8];
    if (i < m)
        for (int c = 0; c < 256; c++)
            for (int j = 0; j < 8; j++) table[8 * c + j] = (c >> j) & 1 ? s : -s;
    for (; i < m; i++) memcpy(out + 8 * i, table + 8 * packed[i], 32);
}

/* sign_residual: out[i] = x[i] - (bit i ? s : -s) for 8 m elements (out may be x: no restrict on either) */
void ft_sign_residual(const float *x, const uint8_t *restrict packed, int64_t m, float s, float *out) {
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 pos = _mm512_set1_ps(s), neg = _mm512_set1_ps(-s);
    for (; i + 2 <= m; i += 2) {
        uint16_t k;
        memcpy(&k, packed + i, 2);
        _mm512_storeu_ps(out + 8 * i, _mm512_sub_ps(_mm512_loadu_ps(x + 8 * i), _mm512_mask_blend_ps(k, neg, pos)));
    }
#endif
    for (; i < m; i++)
        for (int j = 0; j < 8; j++) out[8 * i + j] = x[8 * i + j] - ((packed[i] >> j) & 1 ? s : -s);
}

/* |v| as its bit pattern: integer order of these is the order of |v| (NaN above inf, as torch.topk ranks it) */
static inline uint32_t absbits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u & 0x7FFFFFFFu;
}

/* the r-th smallest (from 0) of a[0, m), m > r >= 0, reordering a: a radix select, 11 + 11 + 10 bits from the
   top, each digit by a histogram of the elements that match the digits found so far, which are then moved to the
   front (branch-free, as the counting is) */
static uint32_t select_u32(uint32_t *a, int64_t m, int64_t r) {
    static const int shift[3] = {21, 10, 0};
    uint32_t prefix = 0, known = 0;
    int64_t count[2048];
    for (int d = 0; d < 3; d++) {
        uint32_t digits = d < 2 ? 2048 : 1024;
        memset(count, 0, sizeof count);
        for (int64_t c = 0; c < m; c++) count[(a[c] >> shift[d]) & (digits - 1)]++;
        uint32_t b = 0;
        while (count[b] <= r) r -= count[b++];
        prefix |= b << shift[d];
        known |= (digits - 1) << shift[d];
        int64_t o = 0;
        for (int64_t c = 0; c < m; c++) {
            uint32_t v = a[c];
            a[o] = v;
            o += (v & known) == prefix;
        }
        m = o;
    }
    return prefix;
}

/* the (r+1)-th smallest |x| bit pattern of the sample x[0], x[stride], ..., m of them (work: m uint32) */
uint32_t ft_sample_rank(const float *x, int64_t stride, int64_t m, int64_t r, uint32_t *work) {
    for (int64_t i = 0; i < m; i++) work[i] = absbits(x[i * stride]);
    return select_u32(work, m, r);
}

/* kernels.topk_select's answer from the candidates with |x_i|'s bit pattern >= thr (thr <= the k-th largest's; all
   comparisons on bit patterns, so NaN ranks above inf, as in the reference): the k largest |x|, ties at the k-th
   largest broken towards lower indices, as ascending int32 indices idx and their values val.
   Returns the candidates' count; when it is below k or above cap nothing is written (the caller goes elsewhere).
   cand, cval (their values), work: cap each. With AVX-512 the candidates' indices and values are
   compress-stored 16 compares at a time. */
int64_t ft_topk(const float *restrict x, int64_t n, uint32_t thr, int64_t k, int64_t cap, int32_t *restrict cand,
                float *restrict cval, uint32_t *restrict work, int32_t *restrict idx, float *restrict val) {
    int64_t count = 0, i = 0;
#ifdef __AVX512F__
    const __m512i t = _mm512_set1_epi32((int)thr), magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= n; i += 16, iv = _mm512_add_epi32(iv, step)) {
        __m512 v = _mm512_loadu_ps(x + i);
        __mmask16 m = _mm512_cmpge_epu32_mask(_mm512_and_si512(_mm512_castps_si512(v), magnitude), t);
        if (count + 16 > cap) return cap + 1;
        _mm512_storeu_si512(cand + count, _mm512_maskz_compress_epi32(m, iv));   /* all 16 lanes, no branch */
        _mm512_storeu_ps(cval + count, _mm512_maskz_compress_ps(m, v));
        count += __builtin_popcount(m);
    }
#endif
    for (; i < n; i++)
        if (absbits(x[i]) >= thr) {
            if (count >= cap) return cap + 1;
            cand[count] = (int32_t)i;
            cval[count++] = x[i];
        }
    if (count < k || k == 0) return count;
    for (int64_t c = 0; c < count; c++) work[c] = absbits(cval[c]);
    uint32_t v = select_u32(work, count, count - k);                     /* the k-th largest |x| */
    int64_t above = 0;
    for (int64_t c = 0; c < count; c++) above += absbits(cval[c]) > v;
    int64_t ties = k - above, o = 0;
    for (int64_t c = 0; c < count; c++) {
        uint32_t a = absbits(cval[c]);
        if (a > v || (a == v && ties-- > 0)) { idx[o] = cand[c]; val[o] = cval[c]; o++; }
    }
    return count;
}

/* kernels.lowrank_product: out (n, len) = sum over j = 0..r-1, in that order, of coef[i, j] A[j, :] (real, coef
   (n, r)), or with complex coef[i, j] = (a, b) and A's rows as interleaved (c, d) pairs, of the pairs
   (a c - b d, a d + b c). Column chunks go outermost, so a chunk of A (r rows) is read from memory once and stays in
   cache while every output row adds its r terms, row by row, into its chunk in L1. */

/* o[f0:f1] (+)= (a + bi) q as pairs (a c + -(b d), a d + b c). Not left to the vectoriser: gcc recognises a complex
   multiply and emits fused multiply-adds even with -ffp-contract=off, which changes the bits. */
__attribute__((optimize("no-tree-vectorize")))
static void complex_terms(float a, float b, const float *restrict q, float *restrict o, int64_t f0, int64_t f1,
                          int first) {
    int64_t f = f0;
#ifdef __AVX512F__
    const __m512 av = _mm512_set1_ps(a);
    const __m512 bv = _mm512_mask_blend_ps(0x5555, _mm512_set1_ps(b), _mm512_set1_ps(-b));   /* (-b, b) pairs */
    for (; f + 16 <= f1; f += 16) {
        __m512 qv = _mm512_loadu_ps(q + f);
        __m512 t = _mm512_add_ps(_mm512_mul_ps(av, qv), _mm512_mul_ps(bv, _mm512_permute_ps(qv, 0xB1)));
        _mm512_storeu_ps(o + f, first ? t : _mm512_add_ps(_mm512_loadu_ps(o + f), t));
    }
#endif
    for (; f < f1; f += 2) {
        float c = q[f], d = q[f + 1];
        float re = a * c - b * d, im = a * d + b * c;
        o[f] = first ? re : o[f] + re;
        o[f + 1] = first ? im : o[f + 1] + im;
    }
}

void ft_lowrank(const float *restrict coef, const float *restrict A, int is_complex, int64_t n, int64_t r,
                int64_t len, float *restrict out) {
    const int64_t CH = 1024;
    for (int64_t f0 = 0; f0 < len; f0 += CH) {
        int64_t f1 = f0 + CH < len ? f0 + CH : len;
        for (int64_t i = 0; i < n; i++) {
            float *restrict o = out + i * len;
            for (int64_t j = 0; j < r; j++) {
                const float *restrict q = A + j * len;
                if (is_complex) {
                    complex_terms(coef[2 * (i * r + j)], coef[2 * (i * r + j) + 1], q, o, f0, f1, j == 0);
                    continue;
                }
                float a = coef[i * r + j];
                if (j == 0) for (int64_t f = f0; f < f1; f++) o[f] = a * q[f];
                else for (int64_t f = f0; f < f1; f++) o[f] = o[f] + a * q[f];
            }
        }
    }
}

/* scatter_dense's accumulate: out[idx[j]] += val[j] for j = 0, 1, ..., m - 1 in that order (index_add_'s), after
   checking every index is in [0, n): returns -1, or the first j whose index is not (and out is left as it was) */
int64_t ft_scatter_add(float *restrict out, int64_t n, const int32_t *restrict idx, const float *restrict val,
                       int64_t m) {
    for (int64_t j = 0; j < m; j++)
        if (idx[j] < 0 || idx[j] >= n) return j;
    for (int64_t j = 0; j < m; j++) out[idx[j]] += val[j];
    return -1;
}
