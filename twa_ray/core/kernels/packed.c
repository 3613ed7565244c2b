/* Packed low-bit GEMV pair of the TWA coefficient step, read straight from the packed bytes.
 *
 *   project:      a[k,l]  = scale[k,l] * <q[k, block l], g_l> + zero[k,l] * sum(g_l)
 *   reconstruct:  theta_j = o_j + sum_k (alpha*scale)[k,l] q[k,j] + sum_k alpha[k,l] zero[k,l]
 *                 (j in block l)
 *
 * q holds b-bit codes (b = 1, 2, 4, 8): code j of a row is bits [(j % P) b, (j % P + 1) b) of
 * byte j / P, P = 8 / b. Each block starts on a byte boundary of its row.
 *
 * Work is cut into tiles of at most TILE columns inside one block; tiles run in parallel
 * (OpenMP). A tile rearranges its slice of g (project) or accumulates its slice of theta
 * (reconstruct) in "planes" that stay in L1 while all R rows stream through it once, so g is
 * never re-read from memory per row. Partial dot products are float32 within a tile and summed
 * in double across tiles.
 *
 * AVX2 layout ("lane planes"): a 32-byte load of a row is 8 lanes of 32 bits, each holding
 * C = 32 / b codes. Plane n holds code n of every lane. No int -> float conversion is done (on
 * Zen 1 cvtdq2ps has one pipe and capped the kernels at ~4 codes per cycle): code n, isolated
 * by one AND (after a 16-bit shift for the upper half of the lane), *is* a float -- the
 * subnormal q 2^(s - 149), s < 16 its bit offset in the half, exponent field 0. FMAs take
 * subnormal inputs at full speed (measured on Zen 1) and compute the product exactly. In
 * project the plane's g carries the power of two 2^(K - s) that brings the products to
 * q g 2^(K - 149), a normal float, and the tile's sums are scaled back by 2^(149 - K). In
 * reconstruct the row's coefficient carries 2^K (one register per row, no per-plane table), plane
 * n accumulates 2^s times its share, and the planes are multiplied by 2^-s once per tile, after
 * all rows. K is set per tile (project) or block (reconstruct) from the largest |g| (or
 * |coefficient|); all the scalings are exact powers of two, so results equal those of an exact
 * conversion. This needs denormals-are-zero off: the kernels clear the DAZ bit of MXCSR while
 * they run (torch.set_flush_denormal(True) sets it). Without AVX2 a portable loop over byte
 * planes is used.
 *
 * Rows are read in 32-byte vectors. The partial last vector of a tile is loaded in place when it
 * lies inside the matrix (every row but the last: no copy, which matters for models with many
 * small blocks, e.g. the 38 BatchNorm vectors of a ResNet-20), else copied to a padded buffer.
 * Row counts that are not a multiple of the row group run as one specialized smaller group.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TWA_AVX2 1
#endif

#define TILE 4096              /* columns per tile (a multiple of 256): 16 KiB of planes */
#define SCRATCH (TILE + 256)   /* floats of plane scratch per thread (room for padding) */
#define PROJECT_GROUP 4        /* rows per pass in project: independent FMA chains, one g load */
#define PREFETCH 512           /* bytes ahead in a row: ~5% over the hardware prefetcher alone */
#define RECON_GROUP 4          /* rows per pass in reconstruct: one load + store of acc each */
#define INLINE static inline __attribute__((always_inline))

int twa_abi_version(void) { return 1; }

typedef struct {
    int64_t block;  /* block index l */
    int64_t col;    /* first column (absolute) */
    int64_t ncols;  /* columns in the tile (<= TILE) */
    int64_t byte;   /* first byte of the tile in a row of data */
} tile_t;

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

INLINE int64_t tile_bytes(int bits, int64_t ncols) { return (ncols * bits + 7) / 8; }

#ifdef TWA_AVX2
/* ---------------------------------------------------------------------- AVX2 lane planes */

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

#else
/* ------------------------------------------------------------------ portable byte planes */

/* Plane p holds the columns j = i P + p: code p of byte i meets gp[p ps + i]. */
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

/* One function per bit width, so the compiler specializes the inlined tile code. */
#define SPECIALIZE(BITS)                                                                        \
    static void project_##BITS(const uint8_t *d, int64_t st, int64_t R, const tile_t *t,      \
                               const float *g, float *part, float *gs, float *gp,             \
                               const uint8_t *e) {                                            \
        project_tile(BITS, d, st, R, t, g, part, gs, gp, e);                                  \
    }                                                                                           \
    static void reconstruct_##BITS(const uint8_t *d, int64_t st, int64_t R, const tile_t *t,  \
                                   const float *c, int64_t L, float b, const float *o,        \
                                   float *y, float *acc, const uint8_t *e) {                  \
        reconstruct_tile(BITS, d, st, R, t, c, L, b, o, y, acc, e);                           \
    }
SPECIALIZE(1)
SPECIALIZE(2)
SPECIALIZE(4)
SPECIALIZE(8)

/* ---------------------------------------------------------------------------- entry points */

/* a (R, L) row-major. Returns 0, or -1 when out of memory. */
int twa_project(int bits, int64_t R, int64_t L, const uint8_t *data, int64_t stride,
                const int64_t *bounds, const int64_t *byte_bounds, const float *scale,
                const float *zero, const float *g, float *a, int num_threads) {
    const int64_t T = make_tiles(bits, L, bounds, byte_bounds, NULL, NULL);
    tile_t *tiles = malloc(sizeof(tile_t) * T);
    int64_t *first = malloc(sizeof(int64_t) * (L + 1));
    float *part = malloc(sizeof(float) * (T * R + 1)), *gsum = malloc(sizeof(float) * T);
    if (!tiles || !first || !part || !gsum) {
        free(tiles), free(first), free(part), free(gsum);
        return -1;
    }
    make_tiles(bits, L, bounds, byte_bounds, tiles, first);
    const uint8_t *end = data + (R - 1) * stride + byte_bounds[L];
#pragma omp parallel num_threads(num_threads)
    {
        float gp[SCRATCH] __attribute__((aligned(64)));
#ifdef TWA_AVX2
        const unsigned int csr = allow_subnormals();
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < T; ++t) {
            float *pt = part + t * R, *gs = gsum + t;
            switch (bits) {
                case 1: project_1(data, stride, R, tiles + t, g, pt, gs, gp, end); break;
                case 2: project_2(data, stride, R, tiles + t, g, pt, gs, gp, end); break;
                case 4: project_4(data, stride, R, tiles + t, g, pt, gs, gp, end); break;
                default: project_8(data, stride, R, tiles + t, g, pt, gs, gp, end); break;
            }
        }
#ifdef TWA_AVX2
        _mm_setcsr(csr);
#endif
    }
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
 * Returns 0, or -1 when out of memory. */
int twa_reconstruct(int bits, int64_t R, int64_t L, const uint8_t *data, int64_t stride,
                    const int64_t *bounds, const int64_t *byte_bounds, const float *scale,
                    const float *zero, const float *alpha, const float *origin, float *out,
                    int num_threads) {
    const int64_t T = make_tiles(bits, L, bounds, byte_bounds, NULL, NULL);
    tile_t *tiles = malloc(sizeof(tile_t) * T);
    float *coef = malloc(sizeof(float) * (R * L + 1)), *bias = malloc(sizeof(float) * L);
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
    const uint8_t *end = data + (R - 1) * stride + byte_bounds[L];
#pragma omp parallel num_threads(num_threads)
    {
        float acc[SCRATCH] __attribute__((aligned(64)));
#ifdef TWA_AVX2
        const unsigned int csr = allow_subnormals();
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < T; ++t) {
            const tile_t *tt = tiles + t;
            const float b = bias[tt->block];
            switch (bits) {
                case 1: reconstruct_1(data, stride, R, tt, coef, L, b, origin, out, acc, end); break;
                case 2: reconstruct_2(data, stride, R, tt, coef, L, b, origin, out, acc, end); break;
                case 4: reconstruct_4(data, stride, R, tt, coef, L, b, origin, out, acc, end); break;
                default: reconstruct_8(data, stride, R, tt, coef, L, b, origin, out, acc, end); break;
            }
        }
#ifdef TWA_AVX2
        _mm_setcsr(csr);
#endif
    }
    free(tiles), free(coef), free(bias);
    return 0;
}
