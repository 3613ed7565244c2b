/* Packed low-bit GEMV pair of the TWA coefficient step, read straight from the packed bytes.
 *
 *   project:      a[k,l]  = scale[k,l] * <q[k, block l], g_l> + zero[k,l] * sum(g_l)
 *   reconstruct:  theta_j = o_j + sum_k (alpha*scale)[k,l] q[k,j] + sum_k alpha[k,l] zero[k,l]
 *                 (j in block l)
 *
 * q holds b-bit codes (b = 1, 2, 4, 8), P = 8/b per byte: code j of a row is bits
 * [(j % P) * b, (j % P + 1) * b) of byte j / P. Each block starts on a byte boundary.
 *
 * Work is cut into tiles of TILE columns inside one block. A tile de-interleaves its slice of g
 * (or accumulates its slice of theta) into P "planes" -- plane p holds the columns j = i*P + p --
 * so code p of byte i meets plane p at index i and the inner loops are plain vector loops with
 * no shuffles. The planes stay in L1 while all R rows stream through the tile, GROUP rows at a
 * time (one load of g or of the accumulator serves GROUP rows). Tiles run in parallel (OpenMP).
 * Partial dot products are float32 within a tile and summed in double across tiles.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 4096            /* columns per tile: 16 KiB of planes, L1-resident */
#define PLANE_PAD 16         /* plane stride rounded up to 16 floats (64 bytes) */
#define SCRATCH (TILE + 8 * PLANE_PAD)
#define GROUP 4              /* rows per pass over the planes */
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
            tiles[t].byte = byte_bounds[l] + c * bits / 8;  /* TILE is a multiple of 8 */
        }
    }
    if (first) first[L] = t;
    return t;
}

INLINE int64_t tile_bytes(int bits, int64_t ncols) { return (ncols * bits + 7) / 8; }
INLINE int64_t plane_stride(int64_t nb) { return (nb + PLANE_PAD - 1) / PLANE_PAD * PLANE_PAD; }

/* ------------------------------------------------------------------------------ project */

INLINE float dot_planes(int bits, const uint8_t *x, const float *gp, int64_t nb, int64_t ps) {
    const int P = 8 / bits, M = (1 << bits) - 1;
    float acc = 0.0f;
    for (int p = 0; p < P; ++p) {
        const float *gs = gp + p * ps;
        for (int64_t i = 0; i < nb; ++i) acc += (float)((x[i] >> (p * bits)) & M) * gs[i];
    }
    return acc;
}

INLINE void project_tile(int bits, const uint8_t *data, int64_t stride, int64_t R, const tile_t *t,
                         const float *g, float *part, float *gsum, float *gp) {
    const int P = 8 / bits, M = (1 << bits) - 1;
    const int64_t nb = tile_bytes(bits, t->ncols), ps = plane_stride(nb);
    const float *gt = g + t->col;
    float s = 0.0f;
    for (int64_t j = 0; j < t->ncols; ++j) s += gt[j];
    *gsum = s;
    for (int p = 0; p < P; ++p)  /* plane p: columns p, P + p, 2P + p, ... (0 past the end) */
        for (int64_t i = 0; i < nb; ++i) {
            int64_t j = i * P + p;
            gp[p * ps + i] = j < t->ncols ? gt[j] : 0.0f;
        }
    const uint8_t *base = data + t->byte;
    int64_t k = 0;
    for (; k + GROUP <= R; k += GROUP) {
        const uint8_t *x0 = base + k * stride, *x1 = x0 + stride, *x2 = x1 + stride,
                      *x3 = x2 + stride;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        for (int p = 0; p < P; ++p) {
            const float *gs = gp + p * ps;
            const int sh = p * bits;
            for (int64_t i = 0; i < nb; ++i) {
                const float gv = gs[i];
                a0 += (float)((x0[i] >> sh) & M) * gv;
                a1 += (float)((x1[i] >> sh) & M) * gv;
                a2 += (float)((x2[i] >> sh) & M) * gv;
                a3 += (float)((x3[i] >> sh) & M) * gv;
            }
        }
        part[k] = a0, part[k + 1] = a1, part[k + 2] = a2, part[k + 3] = a3;
    }
    for (; k < R; ++k) part[k] = dot_planes(bits, base + k * stride, gp, nb, ps);
}

#define TILE_FN(NAME, BITS) \
    static void NAME##_##BITS(const uint8_t *d, int64_t st, int64_t R, const tile_t *t, \
                              const float *a, float *b, float *c, float *e)

TILE_FN(project, 1) { project_tile(1, d, st, R, t, a, b, c, e); }
TILE_FN(project, 2) { project_tile(2, d, st, R, t, a, b, c, e); }
TILE_FN(project, 4) { project_tile(4, d, st, R, t, a, b, c, e); }
TILE_FN(project, 8) { project_tile(8, d, st, R, t, a, b, c, e); }

/* a (R, L) row-major. Returns 0, or -1 when out of memory. */
int twa_project(int bits, int64_t R, int64_t L, const uint8_t *data, int64_t stride,
                const int64_t *bounds, const int64_t *byte_bounds, const float *scale,
                const float *zero, const float *g, float *a, int num_threads) {
    const int64_t T = make_tiles(bits, L, bounds, byte_bounds, NULL, NULL);
    tile_t *tiles = malloc(sizeof(tile_t) * T);
    int64_t *first = malloc(sizeof(int64_t) * (L + 1));
    float *part = malloc(sizeof(float) * T * R), *gsum = malloc(sizeof(float) * T);
    if (!tiles || !first || !part || !gsum) {
        free(tiles), free(first), free(part), free(gsum);
        return -1;
    }
    make_tiles(bits, L, bounds, byte_bounds, tiles, first);
#pragma omp parallel num_threads(num_threads)
    {
        float gp[SCRATCH] __attribute__((aligned(64)));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < T; ++t) {
            float *pt = part + t * R, *gs = gsum + t;
            switch (bits) {
                case 1: project_1(data, stride, R, tiles + t, g, pt, gs, gp); break;
                case 2: project_2(data, stride, R, tiles + t, g, pt, gs, gp); break;
                case 4: project_4(data, stride, R, tiles + t, g, pt, gs, gp); break;
                default: project_8(data, stride, R, tiles + t, g, pt, gs, gp); break;
            }
        }
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

/* -------------------------------------------------------------------------- reconstruct */

INLINE void axpy_planes(int bits, const uint8_t *x, float c, float *acc, int64_t nb, int64_t ps) {
    const int P = 8 / bits, M = (1 << bits) - 1;
    for (int p = 0; p < P; ++p) {
        float *as = acc + p * ps;
        for (int64_t i = 0; i < nb; ++i) as[i] += c * (float)((x[i] >> (p * bits)) & M);
    }
}

INLINE void reconstruct_tile(int bits, const uint8_t *data, int64_t stride, int64_t R,
                             const tile_t *t, const float *coef, int64_t L, float bias,
                             const float *origin, float *out, float *acc) {
    const int P = 8 / bits, M = (1 << bits) - 1;
    const int64_t nb = tile_bytes(bits, t->ncols), ps = plane_stride(nb), l = t->block;
    memset(acc, 0, sizeof(float) * P * ps);
    const uint8_t *base = data + t->byte;
    int64_t k = 0;
    for (; k + GROUP <= R; k += GROUP) {
        const uint8_t *x0 = base + k * stride, *x1 = x0 + stride, *x2 = x1 + stride,
                      *x3 = x2 + stride;
        const float c0 = coef[k * L + l], c1 = coef[(k + 1) * L + l], c2 = coef[(k + 2) * L + l],
                    c3 = coef[(k + 3) * L + l];
        for (int p = 0; p < P; ++p) {
            float *as = acc + p * ps;
            const int sh = p * bits;
            for (int64_t i = 0; i < nb; ++i)
                as[i] += c0 * (float)((x0[i] >> sh) & M) + c1 * (float)((x1[i] >> sh) & M) +
                         c2 * (float)((x2[i] >> sh) & M) + c3 * (float)((x3[i] >> sh) & M);
        }
    }
    for (; k < R; ++k) axpy_planes(bits, base + k * stride, coef[k * L + l], acc, nb, ps);
    /* back from planes to columns; origin may alias out (same index read, then written) */
    float *ot = out + t->col;
    const float *og = origin ? origin + t->col : NULL;
    for (int p = 0; p < P; ++p)
        for (int64_t i = 0; i * P + p < t->ncols; ++i) {
            const int64_t j = i * P + p;
            ot[j] = (og ? og[j] : 0.0f) + bias + acc[p * ps + i];
        }
}

#define RECON_FN(BITS) \
    static void reconstruct_##BITS(const uint8_t *d, int64_t st, int64_t R, const tile_t *t, \
                                   const float *c, int64_t L, float b, const float *o, float *y, \
                                   float *acc) { reconstruct_tile(BITS, d, st, R, t, c, L, b, o, y, acc); }

RECON_FN(1)
RECON_FN(2)
RECON_FN(4)
RECON_FN(8)

/* alpha, scale, zero (R, L) row-major; origin (D,) or NULL; out (D,). Returns 0, or -1. */
int twa_reconstruct(int bits, int64_t R, int64_t L, const uint8_t *data, int64_t stride,
                    const int64_t *bounds, const int64_t *byte_bounds, const float *scale,
                    const float *zero, const float *alpha, const float *origin, float *out,
                    int num_threads) {
    const int64_t T = make_tiles(bits, L, bounds, byte_bounds, NULL, NULL);
    tile_t *tiles = malloc(sizeof(tile_t) * T);
    float *coef = malloc(sizeof(float) * R * L), *bias = malloc(sizeof(float) * L);
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
#pragma omp parallel num_threads(num_threads)
    {
        float acc[SCRATCH] __attribute__((aligned(64)));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < T; ++t) {
            const float b = bias[tiles[t].block];
            switch (bits) {
                case 1: reconstruct_1(data, stride, R, tiles + t, coef, L, b, origin, out, acc); break;
                case 2: reconstruct_2(data, stride, R, tiles + t, coef, L, b, origin, out, acc); break;
                case 4: reconstruct_4(data, stride, R, tiles + t, coef, L, b, origin, out, acc); break;
                default: reconstruct_8(data, stride, R, tiles + t, coef, L, b, origin, out, acc); break;
            }
        }
    }
    free(tiles), free(coef), free(bias);
    return 0;
}
