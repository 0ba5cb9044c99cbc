/* Fused nuLSQ fake quantization with QDrop's keep-mask, forward and backward (one table of levels).
 *
 * A table of n + 1 increasing levels L_0..L_n and the n steps d_m the levels were summed from.
 * forward : m = the number of inner levels L_1..L_{n-1} strictly below x (torch.bucketize's rule),
 *           u = (x - L_m) / d_m, r = rint(clamp(u, 0, 1)) (half to even: a tie goes down),
 *           out = keep ? x : L_{m + r}   (a NaN x stays NaN)
 *           code = 2 where kept float, 1 where x lies beyond the range (below `lo` or above `hi`,
 *           half an end step past the end levels, computed by the caller), 0 elsewhere
 * backward: gx = code == 1 ? 0 : g
 *           sums[m] += g * (r - u) over code 0 (m, u, r recomputed from x as the forward did),
 *           sums[n] += g over code 1 below the range, sums[n + 1] += g over code 1 above it
 *           (the caller turns the two end sums into the steps' share and applies LSQ's factor)
 *
 * The same float arithmetic as the torch composition in nulsq.py, so the forward's values are
 * bit-identical; the backward's sums are added per block, then the blocks in order (independent of
 * the number of threads, not of torch's order). Threads and build flags as lsq.c says.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 16384

static int64_t blocks_of(int64_t n) { return (n + BLOCK - 1) / BLOCK; }

/* The number of blocks a call on n elements cuts its work into: `part` holds (steps + 2) floats per block. */
int64_t qc_nulsq_blocks(int64_t n) { return blocks_of(n); }

/* The interval of x: the number of L_1..L_{n-1} below x, by binary lifting (top: the largest power of
 * two not above n - 1, or 0 when n == 1). */
static inline int64_t interval(const float *restrict L, int64_t n, int64_t top, float x) {
    int64_t m = 0;
    for (int64_t k = top; k > 0; k >>= 1)
        if (m + k <= n - 1 && L[m + k] < x)
            m += k;
    return m;
}

static inline int64_t top_of(int64_t n) {
    int64_t top = 0;
    while ((top ? top * 2 : 1) <= n - 1)
        top = top ? top * 2 : 1;
    return top;
}

void qc_nulsq_forward(const float *restrict x, const float *restrict keep, const float *restrict L,
                      const float *restrict d, int64_t steps, float lo, float hi, float *restrict out,
                      uint8_t *restrict code, int64_t n) {
    int64_t nb = blocks_of(n), top = top_of(steps);
#pragma omp parallel for schedule(static) if (nb > 1)
    for (int64_t b = 0; b < nb; ++b) {
        int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        for (int64_t i = b * BLOCK; i < end; ++i) {
            float v = x[i];
            if (keep && keep[i] != 0.0f) {
                out[i] = v;
                code[i] = 2;
                continue;
            }
            int64_t m = interval(L, steps, top, v);
            float u = (v - L[m]) / d[m];
            float c = u > 0.0f ? (u < 1.0f ? u : 1.0f) : 0.0f; /* a NaN reads no level beyond the table */
            out[i] = v == v ? L[m + (int64_t)rintf(c)] : v;
            code[i] = (uint8_t)(v < lo || v > hi);
        }
    }
}

void qc_nulsq_backward(const float *restrict g, const float *restrict x, const uint8_t *restrict code,
                       const float *restrict L, const float *restrict d, int64_t steps, float lo,
                       float *restrict gx, float *restrict part, double *restrict sums, int64_t n) {
    int64_t nb = blocks_of(n), top = top_of(steps), w = steps + 2;
#pragma omp parallel for schedule(static) if (nb > 1)
    for (int64_t b = 0; b < nb; ++b) {
        float *acc = part + b * w;
        memset(acc, 0, (size_t)w * sizeof(float));
        int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        for (int64_t i = b * BLOCK; i < end; ++i) {
            float v = x[i], gi = g[i];
            uint8_t c = code[i];
            gx[i] = c == 1 ? 0.0f : gi;
            if (c == 0) {
                int64_t m = interval(L, steps, top, v);
                float u = (v - L[m]) / d[m];
                float uc = u > 0.0f ? (u < 1.0f ? u : 1.0f) : 0.0f;
                acc[m] += gi * (rintf(uc) - u);
            } else if (c == 1) {
                acc[v < lo ? steps : steps + 1] += gi;
            }
        }
    }
    for (int64_t j = 0; j < w; ++j)
        sums[j] = 0.0;
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t j = 0; j < w; ++j)
            sums[j] += part[b * w + j];
}
