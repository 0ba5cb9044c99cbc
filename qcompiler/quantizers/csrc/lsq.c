/* Fused LSQ fake quantization with QDrop's keep-mask, forward and backward (per-tensor step).
 *
 * forward : v = x / s, q = clamp(round_half_even(v), lo, hi), out = keep ? x : q * s
 *           code = 2 where kept float, 1 where the clamp bit, 0 inside the range
 * backward: gx = code == 1 ? 0 : g
 *           gs = sum over code != 2 of g * (q - (code == 0 ? v : 0))   (the caller applies LSQ's factor)
 *
 * The same arithmetic as the torch composition (x / s in float, rint under the default rounding
 * mode), so values are bit-identical; one pass over memory each way instead of a dozen, which is
 * what reconstruction on a CPU is bound by. Work is split over `threads` POSIX threads.
 * Built with -fno-trapping-math (as torch itself is) and -fopenmp-simd: without the first GCC keeps
 * the clamp's compares as branches, without the second it does not vectorise the backward's sum;
 * either way the loops run many times slower.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

typedef struct {
    const float *x, *keep, *g;
    float *out, *gx;
    uint8_t *code;
    int64_t begin, end;
    float s, lo, hi;
    double acc;
} job_t;

static void *forward_job(void *arg) {
    job_t *j = (job_t *)arg;
    const float s = j->s, lo = j->lo, hi = j->hi;
    const float *restrict x = j->x, *restrict keep = j->keep;
    float *restrict out = j->out;
    uint8_t *restrict code = j->code;
    const int64_t b = j->begin, e = j->end;
    if (keep) {
        for (int64_t i = b; i < e; ++i) {
            float r = rintf(x[i] / s);
            float q = r < lo ? lo : r;
            q = q > hi ? hi : q;
            float k = keep[i];
            out[i] = k != 0.0f ? x[i] : q * s;
            code[i] = (uint8_t)(k != 0.0f ? 2 : (q != r));
        }
    } else {
        for (int64_t i = b; i < e; ++i) {
            float r = rintf(x[i] / s);
            float q = r < lo ? lo : r;
            q = q > hi ? hi : q;
            out[i] = q * s;
            code[i] = (uint8_t)(q != r);
        }
    }
    return 0;
}

static void *backward_job(void *arg) {
    job_t *j = (job_t *)arg;
    const float s = j->s, lo = j->lo, hi = j->hi;
    const float *restrict x = j->x, *restrict gr = j->g;
    const uint8_t *restrict code = j->code;
    float *restrict gx = j->gx;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = j->begin; i < j->end; ++i) {
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
    j->acc = acc;
    return 0;
}

static double run(void *(*fn)(void *), job_t base, int64_t n, int threads) {
    if (threads < 1) threads = 1;
    if (threads > 16) threads = 16;
    job_t jobs[16];
    pthread_t tid[16];
    int64_t chunk = ((n + threads - 1) / threads + 63) / 64 * 64;
    int started[16] = {0};
    for (int t = 0; t < threads; ++t) {
        jobs[t] = base;
        jobs[t].begin = t * chunk < n ? t * chunk : n;
        jobs[t].end = (t + 1) * chunk < n ? (t + 1) * chunk : n;
        jobs[t].acc = 0.0;
    }
    for (int t = 1; t < threads; ++t)
        if (pthread_create(&tid[t], 0, fn, &jobs[t]) == 0) started[t] = 1; else fn(&jobs[t]);
    fn(&jobs[0]);
    double acc = jobs[0].acc;
    for (int t = 1; t < threads; ++t) {
        if (started[t]) pthread_join(tid[t], 0);
        acc += jobs[t].acc;  /* summed in thread order: deterministic for a given thread count */
    }
    return acc;
}

void qc_lsq_forward(const float *x, const float *keep, float *out, uint8_t *code, int64_t n, float s, float lo,
                    float hi, int threads) {
    job_t b = {x, keep, 0, out, 0, code, 0, 0, s, lo, hi, 0.0};
    run(forward_job, b, n, threads);
}

double qc_lsq_backward(const float *g, const float *x, const uint8_t *code, float *gx, int64_t n, float s, float lo,
                       float hi, int threads) {
    job_t b = {x, 0, g, 0, gx, (uint8_t *)code, 0, 0, s, lo, hi, 0.0};
    return run(backward_job, b, n, threads);
}
