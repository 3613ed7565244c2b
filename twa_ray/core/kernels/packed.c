/* Packed low-bit GEMV pair of the TWA coefficient step, read straight from the packed bytes.
 *
 *   project:      a[k,l]  = scale[k,l] * <q[k, block l], g_l> + zero[k,l] * sum(g_l)
 *   reconstruct:  theta_j = o_j + sum_k (alpha*scale)[k,l] q[k,j] + sum_k alpha[k,l] zero[k,l]
 *                 (j in block l)
 *
 * q holds b-bit codes (b = 1, 2, 4, 8): code j of a row is bits [(j % P) b, (j % P + 1) b) of
 * byte j / P, P = 8 / b. Each block starts on a byte boundary of its row.
 *
 * Work is cut into tiles of at most TILE columns inside one block. A tile rearranges its slice of
 * g (project) or accumulates its slice of theta (reconstruct) in "planes" that stay in L1 while
 * all R rows stream through it once, so g is never re-read from memory per row. Partial dot
 * products are float32 within a tile and summed in double across tiles. Every code is converted
 * to float exactly and every product is a float32 FMA, so all paths agree with a float64
 * reference to float32 accuracy.
 *
 * One source, several paths. The file is compiled once per path with the path's -m flags and
 * -DTWA_PATH_<NAME>; each object exports twa_{project,reconstruct}_tile_<name>. The portable
 * object also gets -DTWA_MAIN: the entry points, runtime CPU checks (a path runs only where
 * __builtin_cpu_supports says so, so one build works on any x86) and the thread pool. Which
 * path is fastest is measured by the Python side (twa_ray/core/kernels/cpu.py), not guessed:
 *
 *   portable  plain C over byte planes; the compiler vectorizes it for the baseline ISA (SSE2
 *             on x86-64, NEON on arm64).
 *   avx2      widen: 8 (16) bytes -> 8 (16) int32 lanes (vpmovzxbd), plane p of a lane is
 *   avx512    (lane >> p b) & mask, converted exactly by cvtdq2ps, one FMA per 8 (16) codes.
 *             No subnormals, so no microcode assists on Intel. AVX-512 also adds 1-bit codes
 *             by masked adds and reconstructs 8 rows per pass (32 registers).
 *   avx2sub   the "lane planes" subnormal trick (below): no int -> float conversion at all,
 *             fastest where cvtdq2ps is scarce and subnormal FMA inputs are free (AMD Zen 1);
 *             20x slower on Intel cores, which take an assist on every subnormal input.
 *
 * Threads: a small pool of pthreads owned by this library (not OpenMP). Tiles are claimed one at
 * a time from an atomic counter, the calling thread works too, and idle threads spin only a few
 * microseconds before they sleep on a condition variable. So a descheduled thread delays a call
 * by at most its one tile, and waiting threads give their core back instead of spinning for
 * milliseconds (libgomp's default, which collapsed the step 40x next to one busy process).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(TWA_PATH_AVX2) || defined(TWA_PATH_AVX512) || defined(TWA_PATH_AVX2SUB)
#include <immintrin.h>
#endif

#define TILE 4096             /* columns per tile (a multiple of 256): 16 KiB of planes */
#define SCRATCH (TILE + 256)  /* floats of plane scratch per thread (room for padding) */
#define PROJECT_GROUP 4       /* rows per pass in project: independent FMA chains, one g load */
#define RECON_GROUP 4         /* rows per pass in reconstruct: one load + store of acc each */
#define PREFETCH 512          /* bytes ahead in a row: ~5% over the hardware prefetcher alone */
#define INLINE static inline __attribute__((always_inline))
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

typedef struct {
    int64_t block; /* block index l */
    int64_t col;   /* first column (absolute) */
    int64_t ncols; /* columns in the tile (<= TILE) */
    int64_t byte;  /* first byte of the tile in a row of data */
} tile_t;

/* One call's work, shared by every thread: the tiles and the operands of either direction. */
typedef struct {
    int bits;
    int64_t R, L, stride;
    const uint8_t *data, *end; /* end: one past the last byte of the last row's codes */
    const tile_t *tiles;
    const float *g;                    /* project: g (D,) */
    float *part, *gsum;                /* project: part (T, R), gsum (T,) */
    const float *coef, *bias, *origin; /* reconstruct: alpha*scale (R, L), bias (L,), origin */
    float *out;                        /* reconstruct: theta (D,) */
} job_t;

typedef void (*tile_fn)(const job_t *, int64_t, float *);

INLINE int64_t tile_bytes(int bits, int64_t ncols) { return (ncols * bits + 7) / 8; }

#if defined(TWA_PATH_AVX2) || defined(TWA_PATH_AVX512)
/* ------------------------------------------------------------- AVX2 / AVX-512: widened bytes
 *
 * A chunk is W bytes of a row (W = 8 for AVX2, 16 for AVX-512), zero-extended to W int32
 * lanes, lane i = byte i. Plane p of the chunk is code p of every byte, (lane >> p b) & mask
 * (no AND for the top plane: the lanes hold 8 bits), converted exactly by cvtdq2ps. Plane p of
 * chunk v meets gp[(v P + p) W + i] = g[(v W + i) P + p], so the tile's g (or theta) is
 * deinterleaved once per tile into these planes, not once per row. */
#ifdef TWA_PATH_AVX512
#define W 16
typedef __m512 vf;
typedef __m512i vi;
#define LOAD_CODES(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define SRLI(x, s) _mm512_srli_epi32(x, s)
#define ANDI(x, m) _mm512_and_si512(x, _mm512_set1_epi32(m))
#define CVT(x) _mm512_cvtepi32_ps(x)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define ADD(a, b) _mm512_add_ps(a, b)
#define LOADF(p) _mm512_load_ps(p)
#define LOADUF(p) _mm512_loadu_ps(p)
#define STOREF(p, v) _mm512_store_ps(p, v)
#define ZEROF() _mm512_setzero_ps()
#define SET1(x) _mm512_set1_ps(x)
#define HSUM(v) _mm512_reduce_add_ps(v)
#else
#define W 8
typedef __m256 vf;
typedef __m256i vi;
#define LOAD_CODES(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define SRLI(x, s) _mm256_srli_epi32(x, s)
#define ANDI(x, m) _mm256_and_si256(x, _mm256_set1_epi32(m))
#define CVT(x) _mm256_cvtepi32_ps(x)
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define ADD(a, b) _mm256_add_ps(a, b)
#define LOADF(p) _mm256_load_ps(p)
#define LOADUF(p) _mm256_loadu_ps(p)
#define STOREF(p, v) _mm256_store_ps(p, v)
#define ZEROF() _mm256_setzero_ps()
#define SET1(x) _mm256_set1_ps(x)
INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define HSUM(v) hsum8(v)
#endif

/* Rows per pass in reconstruct: AVX-512's 32 registers hold 8 rows' codes and coefficients,
 * halving the loads and stores of the planes (project stays at 4 rows x 2 accumulators: 8 rows
 * spill and measured slower). */
#ifdef TWA_PATH_AVX512
#define AXPY_GROUP 8
#else
#define AXPY_GROUP 4
#endif

/* Code p of every lane of x, as exact floats. */
INLINE vf decode(int bits, vi x, int p) {
    const int P = 8 / bits;
    if (P == 1) return CVT(x);
    if (p == P - 1) return CVT(SRLI(x, p * bits));
    return CVT(ANDI(p ? SRLI(x, p * bits) : x, (1 << bits) - 1));
}

/* acc + code p of x * y. With AVX-512 a 1-bit code is a mask register: a masked add (2 uops
 * instead of shift, and, convert, FMA), the same float result as the FMA by 0 or 1. */
INLINE vf add_code_times(int bits, vi x, int p, vf y, vf acc) {
#ifdef TWA_PATH_AVX512
    if (bits == 1)
        return _mm512_mask_add_ps(acc, _mm512_test_epi32_mask(x, _mm512_set1_epi32(1 << p)), acc, y);
#endif
    return FMA(decode(bits, x, p), y, acc);
}

/* Chunk v of `rows` rows, widened. A partial last chunk is loaded in place when its W bytes lie
 * inside the matrix (the bytes past the tile meet zero g planes in project and accumulate into
 * plane slots never written out in reconstruct), else copied into a zero-padded buffer. */
INLINE void load_chunk(int rows, const uint8_t *x, int64_t stride, int64_t v, int64_t nb,
                       const uint8_t *end, vi *q) {
    for (int r = 0; r < rows; ++r) {
        const uint8_t *src = x + r * stride + W * v;
        if (W * (v + 1) <= nb) {
            if ((v & (64 / W - 1)) == 0) _mm_prefetch((const char *)(src + PREFETCH), _MM_HINT_T0);
            q[r] = LOAD_CODES(src);
        } else if (src + W <= end) {
            q[r] = LOAD_CODES(src);
        } else {
            uint8_t pad[W] = {0};
            memcpy(pad, src, (size_t)(nb - W * v));
            q[r] = LOAD_CODES(pad);
        }
    }
}

/* part[r] = <codes of row x + r stride, planes gp>, r < rows; two accumulators per row (even and
 * odd planes) halve the FMA dependency chains. */
INLINE void project_rows(int bits, int rows, const uint8_t *x, int64_t stride, int64_t nb,
                         const float *gp, float *part, const uint8_t *end) {
    const int P = 8 / bits;
    const int64_t nvec = (nb + W - 1) / W;
    vf acc[PROJECT_GROUP][2];
    for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = ZEROF();
    for (int64_t v = 0; v < nvec; ++v) {
        vi q[PROJECT_GROUP];
        load_chunk(rows, x, stride, v, nb, end, q);
        for (int p = 0; p < P; ++p) {
            const vf g = LOADF(gp + (v * P + p) * W);
            for (int r = 0; r < rows; ++r)
                acc[r][p & 1] = add_code_times(bits, q[r], p, g, acc[r][p & 1]);
        }
    }
    for (int r = 0; r < rows; ++r) part[r] = HSUM(ADD(acc[r][0], acc[r][1]));
}

#define PROJECT_ROWS(N) \
    case N: project_rows(bits, N, x + k * stride, stride, nb, gp, part + k, end); break;

INLINE void project_tile(int bits, const uint8_t *data, int64_t stride, int64_t R, const tile_t *t,
                         const float *g, float *part, float *gsum, float *gp, const uint8_t *end) {
    const int P = 8 / bits;
    const int64_t nb = tile_bytes(bits, t->ncols), nvec = (nb + W - 1) / W, n = t->ncols;
    const float *gt = g + t->col;
    vf vs = ZEROF();
    int64_t j = 0;
    for (; j + W <= n; j += W) vs = ADD(vs, LOADUF(gt + j));
    float s = HSUM(vs);
    for (; j < n; ++j) s += gt[j];
    *gsum = s;
    int64_t v = 0;
    for (; (v + 1) * W * P <= n; ++v)  /* whole chunks: a fixed-stride deinterleave */
        for (int i = 0; i < W; ++i)
            for (int p = 0; p < P; ++p) gp[(v * P + p) * W + i] = gt[(v * W + i) * P + p];
    for (; v < nvec; ++v)
        for (int i = 0; i < W; ++i)
            for (int p = 0; p < P; ++p) {
                const int64_t j = (v * W + i) * P + p;
                gp[(v * P + p) * W + i] = j < n ? gt[j] : 0.0f;
            }
    const uint8_t *x = data + t->byte;
    int64_t k = 0;
    for (; k + PROJECT_GROUP <= R; k += PROJECT_GROUP)
        project_rows(bits, PROJECT_GROUP, x + k * stride, stride, nb, gp, part + k, end);
    switch (R - k) {  /* the remaining rows as one smaller group */
        PROJECT_ROWS(1)
        PROJECT_ROWS(2)
        PROJECT_ROWS(3)
        default: break;
    }
}

/* acc planes += sum_r coef[r] * codes of row x + r stride, r < rows: one load and store of each
 * plane per group of rows. */
INLINE void axpy_rows(int bits, int rows, const uint8_t *x, int64_t stride, int64_t nb,
                      const float *coef, float *acc, const uint8_t *end) {
    const int P = 8 / bits;
    const int64_t nvec = (nb + W - 1) / W;
    vf cs[AXPY_GROUP];
    for (int r = 0; r < rows; ++r) cs[r] = SET1(coef[r]);
    for (int64_t v = 0; v < nvec; ++v) {
        vi q[AXPY_GROUP];
        load_chunk(rows, x, stride, v, nb, end, q);
        for (int p = 0; p < P; ++p) {
            float *ap = acc + (v * P + p) * W;
            vf a = LOADF(ap);
            for (int r = 0; r < rows; ++r) a = add_code_times(bits, q[r], p, cs[r], a);
            STOREF(ap, a);
        }
    }
}

#define AXPY_ROWS(N)                                                   \
    case N: {                                                          \
        float c[N];                                                    \
        for (int r = 0; r < N; ++r) c[r] = coef[(k + r) * L + l];      \
        axpy_rows(bits, N, x + k * stride, stride, nb, c, acc, end);   \
        break;                                                         \
    }

INLINE void reconstruct_tile(int bits, const uint8_t *data, int64_t stride, int64_t R,
                             const tile_t *t, const float *coef, int64_t L, float bias,
                             const float *origin, float *out, float *acc, const uint8_t *end) {
    const int P = 8 / bits;
    const int64_t nb = tile_bytes(bits, t->ncols), nvec = (nb + W - 1) / W, n = t->ncols;
    const int64_t l = t->block;
    memset(acc, 0, sizeof(float) * nvec * W * P);
    const uint8_t *x = data + t->byte;
    int64_t k = 0;
    for (; k + AXPY_GROUP <= R; k += AXPY_GROUP) {
        float c[AXPY_GROUP];
        for (int r = 0; r < AXPY_GROUP; ++r) c[r] = coef[(k + r) * L + l];
        axpy_rows(bits, AXPY_GROUP, x + k * stride, stride, nb, c, acc, end);
    }
    switch (R - k) {
        AXPY_ROWS(1)
        AXPY_ROWS(2)
        AXPY_ROWS(3)
#if AXPY_GROUP > 4
        AXPY_ROWS(4)
        AXPY_ROWS(5)
        AXPY_ROWS(6)
        AXPY_ROWS(7)
#endif
        default: break;
    }
    /* interleave the planes back; origin may alias out: each element is read, then written */
    const float *o = origin ? origin + t->col : NULL;
    float *y = out + t->col;
    int64_t v = 0;
    for (; (v + 1) * W * P <= n; ++v)
        for (int i = 0; i < W; ++i)
            for (int p = 0; p < P; ++p) {
                const int64_t j = (v * W + i) * P + p;
                y[j] = (o ? o[j] : 0.0f) + bias + acc[(v * P + p) * W + i];
            }
    for (int64_t j = v * W * P; j < n; ++j)
        y[j] = (o ? o[j] : 0.0f) + bias + acc[(j / (W * P) * P + j % P) * W + j / P % W];
}
#endif

#ifdef TWA_PATH_AVX2SUB
/* --------------------------------------------------------- AVX2 "lane planes", subnormal codes
 *
 * A 32-byte load of a row is 8 lanes of 32 bits, each holding C = 32 / b codes. Plane n holds
 * code n of every lane. No int -> float conversion is done (on Zen 1 cvtdq2ps has one pipe and
 * capped the kernels at ~4 codes per cycle): code n, isolated by one AND (after a 16-bit shift
 * for the upper half of the lane), *is* a float -- the subnormal q 2^(s - 149), s < 16 its bit
 * offset in the half, exponent field 0. FMAs take subnormal inputs at full speed on AMD Zen and
 * compute the product exactly (Intel cores take a microcode assist per subnormal input: this
 * path is then ~20x slower and the measurement never picks it). In project the plane's g
 * carries the power of two 2^(K - s) that brings the products to q g 2^(K - 149), a normal
 * float, and the tile's sums are scaled back by 2^(149 - K). In reconstruct the row's
 * coefficient carries 2^K (one register per row, no per-plane table), plane n accumulates 2^s
 * times its share, and the planes are multiplied by 2^-s once per tile, after all rows. K is set
 * per tile (project) or block (reconstruct) from the largest |g| (or |coefficient|); all the
 * scalings are exact powers of two, so results equal those of an exact conversion. This needs
 * denormals-are-zero off: the tile functions clear the DAZ bit of MXCSR while they run
 * (torch.set_flush_denormal(True) sets it).
 *
 * Rows are read in 32-byte vectors; a partial last vector is loaded in place when it lies inside
 * the matrix, else copied to a padded buffer. */

/* 2^e as a float, -126 <= e <= 127. */
INLINE float pow2f(int e) {
    union {
        uint32_t u;
        float f;
    } v = {(uint32_t)(127 + e) << 23};
    return v.f;
}

/* The K of the header for values whose largest magnitude is m: m 2^K ~ 2^100, which keeps the
 * plane factors 2^(K - s) finite and the products normal down to m 2^-77. */
INLINE int scale_exponent(float m) {
    int e = 0;
    if (m > 0.0f) {
        union {
            float f;
            uint32_t u;
        } v = {m};
        e = (int)((v.u >> 23) & 0xFF) - 127;
    }
    const int K = 100 - e;
    return K < 22 ? 22 : (K > 127 ? 127 : K);
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum(x[0:n]); *absmax = max |x[0:n]|. */
INLINE float sum_absmax(const float *x, int64_t n, float *absmax) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 s = _mm256_setzero_ps(), m = s;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        s = _mm256_add_ps(s, v);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
    }
    float total = hsum(s), top = 0.0f;
    for (int i = 0; i < 8; ++i) top = fmaxf(top, m[i]);
    for (; j < n; ++j) {
        total += x[j];
        top = fmaxf(top, fabsf(x[j]));
    }
    *absmax = top;
    return total;
}

/* Bit offset of plane n inside its 16-bit half-lane. */
INLINE int plane_shift(int bits, int n) { return (n * bits) % 16; }

/* Clear denormals-are-zero in this thread; returns the MXCSR to restore. */
INLINE unsigned int allow_subnormals(void) {
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr & ~0x0040u);
    return csr;
}

INLINE void transpose8(__m256 *r) {
    __m256 t[8], s[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}

/* Geometry of a tile: nvec 32-byte vectors per row, nfull of them complete. The planes are
 * stored vector-major: plane n of vector v is the 8 floats at (v C + n) 8. */
typedef struct {
    int64_t nb, nvec, nfull;
} geom_t;

INLINE geom_t geometry(int bits, int64_t ncols) {
    geom_t g;
    g.nb = tile_bytes(bits, ncols);
    g.nvec = (g.nb + 31) / 32;
    g.nfull = g.nb / 32;
    return g;
}

/* Lane i of plane n of vector v is column C (8 v + i) + n. */
INLINE int64_t plane_index(int C, int64_t j) { return (j / (8 * C) * C + j % C) * 8 + j / C % 8; }

/* W = min(C, 8) consecutive floats at p as a vector (zero-filled above W). */
INLINE __m256 load_w(int W, const float *p) {
    return W == 8 ? _mm256_loadu_ps(p) : _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps(p), 0);
}

INLINE void store_w(int W, float *p, __m256 v) {
    if (W == 8)
        _mm256_storeu_ps(p, v);
    else
        _mm_storeu_ps(p, _mm256_castps256_ps128(v));
}

/* g into scaled planes: plane n gets g 2^(K - plane_shift(n)); zero past ncols. Whole vectors
 * go through 8 x 8 transposes of W planes, the last partial one element by element. */
INLINE void to_planes(int bits, const float *g, int64_t ncols, const geom_t *gm, int K, float *gp) {
    const int C = 32 / bits, W = C < 8 ? C : 8;
    float f[32];
    for (int n = 0; n < C; ++n) f[n] = pow2f(K - plane_shift(bits, n));
    int64_t v = 0;
    for (; 8 * C * (v + 1) <= ncols; ++v)
        for (int n0 = 0; n0 < C; n0 += W) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i) r[i] = load_w(W, g + C * (8 * v + i) + n0);
            transpose8(r);
            for (int n = 0; n < W; ++n)
                _mm256_store_ps(gp + (v * C + n0 + n) * 8,
                                _mm256_mul_ps(r[n], _mm256_set1_ps(f[n0 + n])));
        }
    memset(gp + v * C * 8, 0, sizeof(float) * (gm->nvec - v) * C * 8);
    for (int64_t j = 8 * C * v; j < ncols; ++j) gp[plane_index(C, j)] = g[j] * f[j % C];
}

/* out[j] = base[j] + bias + unscale * (acc planes at j), for j < ncols (base may be out: each
 * element is read before it is written). */
INLINE void from_planes(int bits, const float *acc, int64_t ncols, const float *base, float bias,
                        float unscale, float *out) {
    const int C = 32 / bits, W = C < 8 ? C : 8;
    const __m256 vb = _mm256_set1_ps(bias), vu = _mm256_set1_ps(unscale);
    int64_t v = 0;
    for (; 8 * C * (v + 1) <= ncols; ++v)
        for (int n0 = 0; n0 < C; n0 += W) {
            __m256 r[8];
            for (int n = 0; n < 8; ++n)
                r[n] = n < W ? _mm256_load_ps(acc + (v * C + n0 + n) * 8) : _mm256_setzero_ps();
            transpose8(r);
            for (int i = 0; i < 8; ++i) {
                const int64_t j = C * (8 * v + i) + n0;
                const __m256 o = base ? load_w(W, base + j) : _mm256_setzero_ps();
                store_w(W, out + j, _mm256_fmadd_ps(r[i], vu, _mm256_add_ps(o, vb)));
            }
        }
    for (int64_t j = 8 * C * v; j < ncols; ++j)
        out[j] = (base ? base[j] : 0.0f) + bias + unscale * acc[plane_index(C, j)];
}

/* Vector v of `rows` rows. A partial last vector is loaded in place when its 32 bytes lie inside
 * the matrix (the bytes past the tile meet zero g planes in project and accumulate into plane
 * slots that are never written out in reconstruct), else copied into a zero-padded buffer. */
INLINE void load_rows(int rows, const uint8_t *x, int64_t stride, int64_t v, const geom_t *gm,
                      const uint8_t *end, uint8_t *pad, __m256i *q) {
    for (int r = 0; r < rows; ++r) {
        const uint8_t *src = x + r * stride + 32 * v;
        if (v < gm->nfull) {
            _mm_prefetch((const char *)(src + PREFETCH), _MM_HINT_T0);  /* never faults */
            q[r] = _mm256_loadu_si256((const __m256i *)src);
        } else if (src + 32 <= end) {
            q[r] = _mm256_loadu_si256((const __m256i *)src);
        } else {
            memset(pad + 32 * r, 0, 32);
            memcpy(pad + 32 * r, src, (size_t)(gm->nb - 32 * v));
            q[r] = _mm256_load_si256((const __m256i *)(pad + 32 * r));
        }
    }
}

/* part[r] = unscale * <codes of row x + r stride, planes gp> for r < rows. The lanes are
 * shifted in place once the planes of their lower half are done. */
INLINE void project_rows(int bits, int rows, const uint8_t *x, int64_t stride, const geom_t *gm,
                         const float *gp, float unscale, float *part, const uint8_t *end,
                         uint8_t *pad) {
    const int C = 32 / bits;
    __m256 acc[PROJECT_GROUP];
    for (int r = 0; r < rows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t v = 0; v < gm->nvec; ++v) {
        __m256i q[PROJECT_GROUP];
        load_rows(rows, x, stride, v, gm, end, pad, q);
        for (int n = 0; n < C; ++n) {
            if (n == C / 2)
                for (int r = 0; r < rows; ++r) q[r] = _mm256_srli_epi32(q[r], 16);
            const __m256 g = _mm256_load_ps(gp + (v * C + n) * 8);
            const __m256i mask = _mm256_set1_epi32(((1 << bits) - 1) << plane_shift(bits, n));
            for (int r = 0; r < rows; ++r)
                acc[r] =
                    _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(q[r], mask)), g, acc[r]);
        }
    }
    for (int r = 0; r < rows; ++r) part[r] = hsum(acc[r]) * unscale;
}

/* The remainder cases of project_tile / reconstruct_tile cover row groups of 4. */
_Static_assert(PROJECT_GROUP == 4 && RECON_GROUP == 4, "update the remainder cases");

#define PROJECT_ROWS(N)                                                                      \
    case N:                                                                                  \
        project_rows(bits, N, x + k * stride, stride, &gm, gp, unscale, part + k, end, pad); \
        break;

INLINE void project_tile(int bits, const uint8_t *data, int64_t stride, int64_t R, const tile_t *t,
                         const float *g, float *part, float *gsum, float *gp, const uint8_t *end) {
    uint8_t pad[PROJECT_GROUP * 32] __attribute__((aligned(32)));
    const geom_t gm = geometry(bits, t->ncols);
    const float *gt = g + t->col;
    float m;
    *gsum = sum_absmax(gt, t->ncols, &m);
    const int K = scale_exponent(m);
    const float unscale = pow2f(149 - K);
    to_planes(bits, gt, t->ncols, &gm, K, gp);
    const uint8_t *x = data + t->byte;
    int64_t k = 0;
    for (; k + PROJECT_GROUP <= R; k += PROJECT_GROUP)
        project_rows(bits, PROJECT_GROUP, x + k * stride, stride, &gm, gp, unscale, part + k, end,
                     pad);
    switch (R - k) {
        PROJECT_ROWS(1)
        PROJECT_ROWS(2)
        PROJECT_ROWS(3)
        default: break;
    }
}

/* acc planes += sum_r coef[r] 2^K * codes of row x + r stride, for r < rows: plane n holds
 * q 2^(plane_shift(n) - 149) coef 2^K, i.e. 2^plane_shift(n) times its share of theta scaled by
 * 2^(K - 149); reconstruct_tile takes the plane factors out once all rows are in. */
INLINE void axpy_rows(int bits, int rows, const uint8_t *x, int64_t stride, const geom_t *gm,
                      const float *coef, int K, float *acc, const uint8_t *end, uint8_t *pad) {
    const int C = 32 / bits;
    __m256 cs[RECON_GROUP];
    for (int r = 0; r < rows; ++r) cs[r] = _mm256_set1_ps(coef[r] * pow2f(K));
    for (int64_t v = 0; v < gm->nvec; ++v) {
        __m256i q[RECON_GROUP];
        load_rows(rows, x, stride, v, gm, end, pad, q);
        for (int n = 0; n < C; ++n) {
            if (n == C / 2)
                for (int r = 0; r < rows; ++r) q[r] = _mm256_srli_epi32(q[r], 16);
            const __m256i mask = _mm256_set1_epi32(((1 << bits) - 1) << plane_shift(bits, n));
            float *ap = acc + (v * C + n) * 8;
            __m256 a = _mm256_load_ps(ap);
            for (int r = 0; r < rows; ++r)
                a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(q[r], mask)), cs[r], a);
            _mm256_store_ps(ap, a);
        }
    }
}

/* Plane n of every vector times 2^-plane_shift(n) (exact): the planes then all hold theta
 * scaled by 2^(K - 149). */
INLINE void unshift_planes(int bits, const geom_t *gm, float *acc) {
    const int C = 32 / bits;
    for (int64_t v = 0; v < gm->nvec; ++v)
        for (int n = 1; n < C; ++n) {
            if (plane_shift(bits, n) == 0) continue;
            float *ap = acc + (v * C + n) * 8;
            _mm256_store_ps(ap, _mm256_mul_ps(_mm256_load_ps(ap),
                                              _mm256_set1_ps(pow2f(-plane_shift(bits, n)))));
        }
}

#define AXPY_ROWS(N)                                                                             \
    case N: {                                                                                    \
        float c[N];                                                                              \
        for (int r = 0; r < N; ++r) c[r] = coef[(k + r) * L + l];                                \
        axpy_rows(bits, N, x + k * stride, stride, &gm, c, K, acc, end, pad);                    \
        break;                                                                                   \
    }

INLINE void reconstruct_tile(int bits, const uint8_t *data, int64_t stride, int64_t R,
                             const tile_t *t, const float *coef, int64_t L, float bias,
                             const float *origin, float *out, float *acc, const uint8_t *end) {
    uint8_t pad[RECON_GROUP * 32] __attribute__((aligned(32)));
    const geom_t gm = geometry(bits, t->ncols);
    const int64_t l = t->block;
    float m = 0.0f;
    for (int64_t k = 0; k < R; ++k) m = fmaxf(m, fabsf(coef[k * L + l]));
    const int K = scale_exponent(m);
    memset(acc, 0, sizeof(float) * gm.nvec * 8 * (32 / bits));
    const uint8_t *x = data + t->byte;
    int64_t k = 0;
    for (; k + RECON_GROUP <= R; k += RECON_GROUP) {
        float c[RECON_GROUP];
        for (int r = 0; r < RECON_GROUP; ++r) c[r] = coef[(k + r) * L + l];
        axpy_rows(bits, RECON_GROUP, x + k * stride, stride, &gm, c, K, acc, end, pad);
    }
    switch (R - k) {
        AXPY_ROWS(1)
        AXPY_ROWS(2)
        AXPY_ROWS(3)
        default: break;
    }
    unshift_planes(bits, &gm, acc);
    from_planes(bits, acc, t->ncols, origin ? origin + t->col : NULL, bias, pow2f(149 - K),
                out + t->col);
}
#endif

#ifdef TWA_PATH_PORTABLE
/* ------------------------------------------------------------------ portable byte planes */

/* Plane p holds the columns j = i P + p: code p of byte i meets gp[p nb + i]. Plain loops over
 * contiguous bytes and planes, which compilers vectorize for the baseline ISA. */
INLINE void project_tile(int bits, const uint8_t *data, int64_t stride, int64_t R, const tile_t *t,
                         const float *g, float *part, float *gsum, float *gp, const uint8_t *end) {
    (void)end;
    const int P = 8 / bits, M = (1 << bits) - 1;
    const int64_t nb = tile_bytes(bits, t->ncols);
    const float *gt = g + t->col;
    float s = 0.0f;
    for (int64_t j = 0; j < t->ncols; ++j) s += gt[j];
    *gsum = s;
    for (int p = 0; p < P; ++p)
        for (int64_t i = 0; i < nb; ++i)
            gp[p * nb + i] = i * P + p < t->ncols ? gt[i * P + p] : 0.0f;
    for (int64_t k = 0; k < R; ++k) {
        const uint8_t *x = data + t->byte + k * stride;
        float acc = 0.0f;
        for (int p = 0; p < P; ++p)
            for (int64_t i = 0; i < nb; ++i) acc += (float)((x[i] >> (p * bits)) & M) * gp[p * nb + i];
        part[k] = acc;
    }
}

INLINE void reconstruct_tile(int bits, const uint8_t *data, int64_t stride, int64_t R,
                             const tile_t *t, const float *coef, int64_t L, float bias,
                             const float *origin, float *out, float *acc, const uint8_t *end) {
    (void)end;
    const int P = 8 / bits, M = (1 << bits) - 1;
    const int64_t nb = tile_bytes(bits, t->ncols);
    memset(acc, 0, sizeof(float) * P * nb);
    for (int64_t k = 0; k < R; ++k) {
        const uint8_t *x = data + t->byte + k * stride;
        const float c = coef[k * L + t->block];
        for (int p = 0; p < P; ++p)
            for (int64_t i = 0; i < nb; ++i) acc[p * nb + i] += c * (float)((x[i] >> (p * bits)) & M);
    }
    for (int64_t j = 0; j < t->ncols; ++j)  /* origin may alias out: same index read, then written */
        out[t->col + j] = (origin ? origin[t->col + j] : 0.0f) + bias + acc[(j % P) * nb + j / P];
}
#endif

/* ------------------------------------------------------------------- this path's tile exports */

#if defined(TWA_PATH_PORTABLE)
#define SUFFIX portable
#elif defined(TWA_PATH_AVX2)
#define SUFFIX avx2
#elif defined(TWA_PATH_AVX512)
#define SUFFIX avx512
#elif defined(TWA_PATH_AVX2SUB)
#define SUFFIX avx2sub
#else
#error "compile with one of -DTWA_PATH_PORTABLE, _AVX2, _AVX512, _AVX2SUB"
#endif

/* One function per bit width, so the compiler specializes the inlined tile code. */
#define SPECIALIZE(B)                                                                      \
    static void project_##B(const job_t *j, const tile_t *t, float *gp) {                  \
        project_tile(B, j->data, j->stride, j->R, t, j->g, j->part + (t - j->tiles) * j->R, \
                     j->gsum + (t - j->tiles), gp, j->end);                                \
    }                                                                                      \
    static void reconstruct_##B(const job_t *j, const tile_t *t, float *acc) {             \
        reconstruct_tile(B, j->data, j->stride, j->R, t, j->coef, j->L, j->bias[t->block], \
                         j->origin, j->out, acc, j->end);                                  \
    }
SPECIALIZE(1)
SPECIALIZE(2)
SPECIALIZE(4)
SPECIALIZE(8)

#ifdef TWA_PATH_AVX2SUB
#define ENTER const unsigned int csr = allow_subnormals();
#define LEAVE _mm_setcsr(csr);
#else
#define ENTER
#define LEAVE
#endif

void CAT(twa_project_tile_, SUFFIX)(const job_t *j, int64_t t, float *scratch) {
    ENTER
    switch (j->bits) {
        case 1: project_1(j, j->tiles + t, scratch); break;
        case 2: project_2(j, j->tiles + t, scratch); break;
        case 4: project_4(j, j->tiles + t, scratch); break;
        default: project_8(j, j->tiles + t, scratch); break;
    }
    LEAVE
}

void CAT(twa_reconstruct_tile_, SUFFIX)(const job_t *j, int64_t t, float *scratch) {
    ENTER
    switch (j->bits) {
        case 1: reconstruct_1(j, j->tiles + t, scratch); break;
        case 2: reconstruct_2(j, j->tiles + t, scratch); break;
        case 4: reconstruct_4(j, j->tiles + t, scratch); break;
        default: reconstruct_8(j, j->tiles + t, scratch); break;
    }
    LEAVE
}

#ifdef TWA_MAIN
/* ============================================================ entry points, CPU checks, pool */
#include <pthread.h>
#include <stdatomic.h>

int twa_abi_version(void) { return 2; }

/* The other paths' objects may be missing (a compiler without AVX-512 support, or not x86):
 * weak references are then NULL and the path is reported unavailable. */
#define DECLARE(S)                                                                         \
    extern void twa_project_tile_##S(const job_t *, int64_t, float *) __attribute__((weak)); \
    extern void twa_reconstruct_tile_##S(const job_t *, int64_t, float *) __attribute__((weak));
DECLARE(avx2)
DECLARE(avx512)
DECLARE(avx2sub)

static int cpu_has(int path) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    switch (path) {
        case 0: return 1;
        case 1: case 3: return avx2;
        case 2: return avx2 && __builtin_cpu_supports("avx512f");
        default: return 0;
    }
#else
    return path == 0;
#endif
}

static const struct {
    const char *name;
    tile_fn project, reconstruct;
} PATHS[] = {
    {"portable", twa_project_tile_portable, twa_reconstruct_tile_portable},
    {"avx2", twa_project_tile_avx2, twa_reconstruct_tile_avx2},
    {"avx512", twa_project_tile_avx512, twa_reconstruct_tile_avx512},
    {"avx2sub", twa_project_tile_avx2sub, twa_reconstruct_tile_avx2sub},
};
#define NPATHS ((int)(sizeof(PATHS) / sizeof(PATHS[0])))

int twa_num_paths(void) { return NPATHS; }
const char *twa_path_name(int path) { return path >= 0 && path < NPATHS ? PATHS[path].name : ""; }
/* 1 when the path was compiled into this library and this CPU can run it. */
int twa_path_available(int path) {
    return path >= 0 && path < NPATHS && PATHS[path].project && PATHS[path].reconstruct &&
           cpu_has(path);
}

/* ---------------------------------------------------------------------------- thread pool
 * One job at a time (callers that find the pool busy run their job on their own thread). The
 * tile counter carries the job's generation in its upper 32 bits and is advanced only by a
 * compare-and-swap that checks it, so a thread that wakes late for an old job can never take
 * a tile of the next one; the caller returns once every tile of its job is done, never waiting
 * for a helper that did not show up. */
#define MAX_THREADS 256
#define SPIN 4000 /* polls (pause instructions) before a waiting thread sleeps: ~10-100 us */

#if defined(__x86_64__) || defined(__i386__)
#define RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define RELAX() __asm__ __volatile__("yield")
#else
#define RELAX() ((void)0)
#endif

static struct {
    pthread_mutex_t mu, busy;
    pthread_cond_t wake, done;
    int started;              /* helper threads alive */
    int helpers;              /* helpers that take part in the current job */
    job_t job;                /* the current job (copied by helpers under mu) */
    tile_fn fn;
    int64_t ntiles;
    _Atomic uint64_t gen;     /* bumped per job */
    _Atomic uint64_t next;    /* (gen << 32) | next unclaimed tile */
    _Atomic int64_t finished; /* tiles of the current job done */
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .busy = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER, .done = PTHREAD_COND_INITIALIZER};

static void run_tiles(uint64_t gen, const job_t *job, tile_fn fn, int64_t n, float *scratch) {
    for (;;) {
        uint64_t v = atomic_load(&pool.next);
        do {
            if (v >> 32 != (gen & 0xFFFFFFFFu) || (int64_t)(v & 0xFFFFFFFFu) >= n) return;
        } while (!atomic_compare_exchange_weak(&pool.next, &v, v + 1));
        fn(job, (int64_t)(v & 0xFFFFFFFFu), scratch);
        if (atomic_fetch_add(&pool.finished, 1) + 1 == n) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_broadcast(&pool.done);
            pthread_mutex_unlock(&pool.mu);
        }
    }
}

static void *helper(void *arg) {
    const int index = (int)(intptr_t)arg; /* 1, 2, ...: the caller is 0 */
    float scratch[SCRATCH] __attribute__((aligned(64)));
    uint64_t seen = atomic_load(&pool.gen);
    for (;;) {
        for (int s = 0; s < SPIN && atomic_load(&pool.gen) == seen; ++s) RELAX();
        pthread_mutex_lock(&pool.mu);
        while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
        seen = atomic_load(&pool.gen);
        const int take_part = index <= pool.helpers;
        const job_t job = pool.job;
        const tile_fn fn = pool.fn;
        const int64_t n = pool.ntiles;
        pthread_mutex_unlock(&pool.mu);
        if (take_part) run_tiles(seen, &job, fn, n, scratch);
    }
    return NULL;
}

/* Threads do not survive fork(): the child starts with no helpers and fresh locks. */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.started = 0;
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static void run_job(const job_t *job, tile_fn fn, int64_t n, int threads) {
    float scratch[SCRATCH] __attribute__((aligned(64)));
    if (threads > n) threads = (int)n;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        for (int64_t t = 0; t < n; ++t) fn(job, t, scratch);
        return;
    }
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool.mu);
    while (pool.started < threads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&th, &attr, helper, (void *)(intptr_t)(pool.started + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* fewer threads: the tiles are shared by those there are */
        ++pool.started;
    }
    pool.helpers = threads - 1 < pool.started ? threads - 1 : pool.started;
    pool.job = *job;
    pool.fn = fn;
    pool.ntiles = n;
    atomic_store(&pool.finished, 0);
    const uint64_t gen = (atomic_load(&pool.gen) + 1) & 0xFFFFFFFFu;
    atomic_store(&pool.next, gen << 32);
    atomic_store(&pool.gen, gen);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    run_tiles(gen, job, fn, n, scratch);
    for (int s = 0; s < SPIN && atomic_load(&pool.finished) < n; ++s) RELAX();
    if (atomic_load(&pool.finished) < n) {
        pthread_mutex_lock(&pool.mu);
        while (atomic_load(&pool.finished) < n) pthread_cond_wait(&pool.done, &pool.mu);
        pthread_mutex_unlock(&pool.mu);
    }
    pthread_mutex_unlock(&pool.busy);
}

/* Cut every block into tiles; first[l] is the index of block l's first tile. Returns the count. */
static int64_t make_tiles(int bits, int64_t L, const int64_t *bounds, const int64_t *byte_bounds,
                          tile_t *tiles, int64_t *first) {
    int64_t t = 0;
    for (int64_t l = 0; l < L; ++l) {
        if (first) first[l] = t;
        for (int64_t c = 0; c < bounds[l + 1] - bounds[l]; c += TILE, ++t) {
            if (!tiles) continue;
            int64_t n = bounds[l + 1] - bounds[l] - c;
            tiles[t].block = l;
            tiles[t].col = bounds[l] + c;
            tiles[t].ncols = n < TILE ? n : TILE;
            tiles[t].byte = byte_bounds[l] + c * bits / 8;
        }
    }
    if (first) first[L] = t;
    return t;
}

/* a (R, L) row-major. Returns 0, -1 when out of memory, -2 for a path that cannot run here. */
int twa_project(int path, int bits, int64_t R, int64_t L, const uint8_t *data, int64_t stride,
                const int64_t *bounds, const int64_t *byte_bounds, const float *scale,
                const float *zero, const float *g, float *a, int num_threads) {
    if (!twa_path_available(path)) return -2;
    const int64_t T = make_tiles(bits, L, bounds, byte_bounds, NULL, NULL);
    tile_t *tiles = malloc(sizeof(tile_t) * (T + 1));
    int64_t *first = malloc(sizeof(int64_t) * (L + 1));
    float *part = malloc(sizeof(float) * (T * R + 1)), *gsum = malloc(sizeof(float) * (T + 1));
    if (!tiles || !first || !part || !gsum) {
        free(tiles), free(first), free(part), free(gsum);
        return -1;
    }
    make_tiles(bits, L, bounds, byte_bounds, tiles, first);
    job_t job = {.bits = bits, .R = R, .L = L, .stride = stride, .data = data,
                 .end = data + (R - 1) * stride + byte_bounds[L], .tiles = tiles, .g = g,
                 .part = part, .gsum = gsum};
    run_job(&job, PATHS[path].project, T, num_threads);
    for (int64_t l = 0; l < L; ++l) {
        double gl = 0.0;
        for (int64_t t = first[l]; t < first[l + 1]; ++t) gl += gsum[t];
        for (int64_t k = 0; k < R; ++k) {
            double s = 0.0;
            for (int64_t t = first[l]; t < first[l + 1]; ++t) s += part[t * R + k];
            a[k * L + l] = (float)((double)scale[k * L + l] * s + (double)zero[k * L + l] * gl);
        }
    }
    free(tiles), free(first), free(part), free(gsum);
    return 0;
}

/* alpha, scale, zero (R, L) row-major; origin (D,) or NULL, may alias out; out (D,).
 * Returns 0, -1 when out of memory, -2 for a path that cannot run here. */
int twa_reconstruct(int path, int bits, int64_t R, int64_t L, const uint8_t *data, int64_t stride,
                    const int64_t *bounds, const int64_t *byte_bounds, const float *scale,
                    const float *zero, const float *alpha, const float *origin, float *out,
                    int num_threads) {
    if (!twa_path_available(path)) return -2;
    const int64_t T = make_tiles(bits, L, bounds, byte_bounds, NULL, NULL);
    tile_t *tiles = malloc(sizeof(tile_t) * (T + 1));
    float *coef = malloc(sizeof(float) * (R * L + 1)), *bias = malloc(sizeof(float) * (L + 1));
    if (!tiles || !coef || !bias) {
        free(tiles), free(coef), free(bias);
        return -1;
    }
    make_tiles(bits, L, bounds, byte_bounds, tiles, NULL);
    for (int64_t l = 0; l < L; ++l) {
        double s = 0.0;
        for (int64_t k = 0; k < R; ++k) {
            coef[k * L + l] = alpha[k * L + l] * scale[k * L + l];
            s += (double)alpha[k * L + l] * zero[k * L + l];
        }
        bias[l] = (float)s;
    }
    job_t job = {.bits = bits, .R = R, .L = L, .stride = stride, .data = data,
                 .end = data + (R - 1) * stride + byte_bounds[L], .tiles = tiles, .coef = coef,
                 .bias = bias, .origin = origin, .out = out};
    run_job(&job, PATHS[path].reconstruct, T, num_threads);
    free(tiles), free(coef), free(bias);
    return 0;
}
#endif
