/* Fused LSQ fake quantization with QDrop's keep-mask, forward and backward (per-tensor step).
 *
 * forward : v = x / s, q = clamp(round_half_even(v), lo, hi), out = keep ? x : q * s
 *           code = 2 where kept float, 1 where the clamp bit, 0 inside the range
 * backward: gx = code == 1 ? 0 : g
 *           gs = sum over code != 2 of g * (q - (code == 0 ? v : 0))   (the caller applies LSQ's factor)
 *
 * The same arithmetic as the torch composition (x / s in float, rint under the default rounding
 * mode), so values are bit-identical; one pass over memory each way instead of a dozen, which is
 * what reconstruction on a CPU is bound by. A call runs in the calling thread only: torch's OpenMP
 * workers spin-wait for a while after every parallel region, so a helper thread started here shared a
 * core with a spinning worker, and both the kernel and the operations around it ran slower
 * (bench/profile_recon.py measures the whole step).
 * Built with -fno-trapping-math (as torch itself is) and -fopenmp-simd: without the first GCC keeps
 * the clamp's compares as branches, without the second it does not vectorise the backward's sum;
 * either way the loops run many times slower.
 */
#include <math.h>
#include <stdint.h>

void qc_lsq_forward(const float *restrict x, const float *restrict keep, float *restrict out, uint8_t *restrict code,
                    int64_t n, float s, float lo, float hi) {
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

double qc_lsq_backward(const float *restrict gr, const float *restrict x, const uint8_t *restrict code,
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
