/* Fused LSQ fake quantization with QDrop's keep-mask, forward and backward (per-tensor step).
 *
 * forward : v = x / s, q = clamp(round_half_even(v), lo, hi), out = keep ? x : q * s
 *           code = 2 where kept float, 1 where the clamp bit, 0 inside the range
 * backward: gx = code == 1 ? 0 : g
 *           gs = sum over code != 2 of g * (q - (code == 0 ? v : 0))   (the caller applies LSQ's factor)
 *
 * The same arithmetic as the torch composition (x / s in float, rint under the default rounding
 * mode), so values are bit-identical; one pass over memory each way instead of a dozen, which is
 * what reconstruction on a CPU is bound by.
 *
 * Threads: the work is cut into fixed blocks of BLOCK elements, shared out by OpenMP. The library is
 * loaded into a process that has already loaded torch, whose libgomp.so.1 then also serves these
 * calls: the same worker threads as torch's own operations, not a second pool. (A pool of our own,
 * tried before, shared each core with one of torch's workers spin-waiting after its last parallel
 * region, and made the whole step slower.) The step's gradient is summed per block, then the
 * blocks in order, so it does not depend on the number of threads.
 * Built with -fno-trapping-math (as torch itself is) and -fopenmp: without the first GCC keeps
 * the clamp's compares as branches, without the second it does not vectorise the backward's sum;
 * either way the loops run many times slower.
 */
#include <math.h>
#include <stdint.h>

#define BLOCK 16384

static int64_t blocks_of(int64_t n) { return (n + BLOCK - 1) / BLOCK; }

/* The number of blocks a call on n elements cuts its work into: the length of the backward's `part`. */
int64_t qc_lsq_blocks(int64_t n) { return blocks_of(n); }

static void forward_block(const float *restrict x, const float *restrict keep, float *restrict out,
                          uint8_t *restrict code, int64_t n, float s, float lo, float hi) {
    if (keep) {
        for (int64_t i = 0; i < n; ++i) {
            float r = rintf(x[i] / s);
            float q = r < lo ? lo : r;
            q = q > hi ? hi : q;
            float k = keep[i];
            out[i] = k != 0.0f ? x[i] : q * s;
            code[i] = (uint8_t)(k != 0.0f ? 2 : (q != r));
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            float r = rintf(x[i] / s);
            float q = r < lo ? lo : r;
            q = q > hi ? hi : q;
            out[i] = q * s;
            code[i] = (uint8_t)(q != r);
        }
    }
}

static float backward_block(const float *restrict gr, const float *restrict x, const uint8_t *restrict code,
                            float *restrict gx, int64_t n, float s, float lo, float hi) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
        float v = x[i] / s;
        float r = rintf(v);
        float q = r < lo ? lo : r;
        q = q > hi ? hi : q;
        float c = (float)code[i];
        float g = gr[i];
        float g_quant = c == 2.0f ? 0.0f : g;    /* kept elements did not go through the quantizer */
        float v_inside = c == 0.0f ? v : 0.0f;   /* d out / d s = q - v inside the range, q outside */
        gx[i] = c == 1.0f ? 0.0f : g;
        acc += g_quant * (q - v_inside);
    }
    return acc;
}

void qc_lsq_forward(const float *restrict x, const float *restrict keep, float *restrict out, uint8_t *restrict code,
                    int64_t n, float s, float lo, float hi) {
    int64_t nb = blocks_of(n);
#pragma omp parallel for schedule(static) if (nb > 1)
    for (int64_t b = 0; b < nb; ++b) {
        int64_t i = b * BLOCK, m = n - i < BLOCK ? n - i : BLOCK;
        forward_block(x + i, keep ? keep + i : 0, out + i, code + i, m, s, lo, hi);
    }
}

/* part: qc_lsq_blocks(n) floats of scratch, one sum per block. */
double qc_lsq_backward(const float *restrict gr, const float *restrict x, const uint8_t *restrict code,
                       float *restrict gx, float *restrict part, int64_t n, float s, float lo, float hi) {
    int64_t nb = blocks_of(n);
#pragma omp parallel for schedule(static) if (nb > 1)
    for (int64_t b = 0; b < nb; ++b) {
        int64_t i = b * BLOCK, m = n - i < BLOCK ? n - i : BLOCK;
        part[b] = backward_block(gr + i, x + i, code + i, gx + i, m, s, lo, hi);
    }
    double acc = 0.0;
    for (int64_t b = 0; b < nb; ++b)
        acc += part[b];
    return acc;
}
