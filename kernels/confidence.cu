// Confidence of one exit's logits and the exit decision, in one pass over each row.
//
// The contract (what max_prob, entropy, margin, label and an invalid row mean) and the float64
// reference this kernel is checked against live in confidence.py; the launcher is in cuda.py.
//
// Each thread strides over its row once and folds every z = logit / temperature into a RowState:
// the running maximum m (the top-1 logit, which is also the shift of an online log-sum-exp), the
// first index holding it, the runner-up, s = sum exp(z - m) and t = sum exp(z - m) * (z - m). When
// m grows, the sums move to the new shift: with d = m_old - m_new <= 0,
//     s' = exp(d) * s,    t' = exp(d) * (t + d * s).
// Partial states merge the same way across the warp (__shfl_xor_sync) and, with a block per row,
// across warps (shared memory). From the merged state:
//     max_prob = 1 / s,   entropy = log(s) - t / s,   margin = (1 - exp(z2 - m)) / s.
// Every exp argument is <= 0 and s >= 1, so peaked rows cannot overflow and flat rows lose nothing.
//
// Shapes, all C-contiguous: logits (B, C) float32, or float16 passed as its raw 16-bit patterns;
// max_prob, entropy, margin (B,) float32; label (B,) int64; exit_mask (B,) uint8 (0 or 1);
// class_thresholds (C,) float32 or null (then `threshold` applies to every row);
// never_exit (B,) uint8 or null (a nonzero flag keeps its row from exiting).
//
// Entry points, per input dtype and row layout:
//   confidence_warp_{f32,f16}:  a warp per row; blockDim.x a multiple of 32, at most 1024;
//                               row = blockIdx.x * (blockDim.x / 32) + warp.
//   confidence_block_{f32,f16}: a block per row, for long rows; blockDim.x a multiple of 32, at most
//                               1024; row = blockIdx.x.

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxWarpsPerBlock = kMaxThreadsPerBlock / kWarpSize;
constexpr unsigned int kFullMask = 0xffffffffu;
constexpr int kNoLabel = 0x7fffffff;  // label of an empty state: loses every tie on value

// Exit metric codes, the position of the metric in confidence.METRICS: 0 max_prob and 2 margin
// pass at or above the threshold, 1 entropy at or below it.
constexpr int kMaxProb = 0;
constexpr int kEntropy = 1;

__device__ __forceinline__ float negative_infinity() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ float quiet_nan() { return __uint_as_float(0x7fffffffu); }

// float16 bits to float32, exactly. Written out rather than __half2float: NVRTC has no built-in
// cuda_fp16.h (and CuPy stopped bundling it for CUDA >= 12.2), and the CPU shim runs this same code.
__device__ __forceinline__ float half_bits_to_float(unsigned short bits) {
    const unsigned int sign = (bits & 0x8000u) << 16;
    const unsigned int exponent = (bits >> 10) & 0x1fu;
    const unsigned int mantissa = bits & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, a normal float32
        return __uint_as_float(sign | __float_as_uint(static_cast<float>(mantissa) * 5.9604644775390625e-8f));
    }
    if (exponent == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));  // inf, nan
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));  // bias 15 -> 127
}

__device__ __forceinline__ float load_logit(const float* logit) { return *logit; }
__device__ __forceinline__ float load_logit(const unsigned short* logit) {
    return half_bits_to_float(*logit);
}

// What one thread, warp or block knows about a row after seeing some of its logits.
struct RowState {
    float top1;           // largest z seen, and the shift of the two sums
    float top2;           // largest z at another index (equal to top1 on a tie); -inf if none
    float sum_exp;        // s = sum exp(z - top1): >= 1 once a logit is in, 0 for an empty state
    float sum_exp_shift;  // t = sum exp(z - top1) * (z - top1), <= 0
    int label;            // first index holding top1; kNoLabel for an empty state
    int all_finite;       // 0 once a NaN or infinite z was seen
};

__device__ __forceinline__ RowState empty_state() {
    return RowState{negative_infinity(), negative_infinity(), 0.f, 0.f, kNoLabel, 1};
}

// Combines two partial states of one row. The state with the larger top1 leads; on equal values the
// lower label leads, which makes the label the first index of the maximum. Symmetric bit for bit,
// so both lanes of a butterfly step end with the same state.
__device__ __forceinline__ RowState merge(const RowState& a, const RowState& b) {
    const bool b_leads = b.top1 > a.top1 || (b.top1 == a.top1 && b.label < a.label);
    // Copies, not references: selecting between two references would put both states in local memory.
    const RowState lead = b_leads ? b : a;
    const RowState other = b_leads ? a : b;
    const float shift = other.top1 - lead.top1;  // <= 0; -inf or NaN when `other` is empty
    const float scale = expf(shift);
    // A zero scale (an empty state, or logits so far below that even -3e38 - 3e38 overflows the
    // shift to -inf) adds nothing; skipping it also avoids shift * sum = inf * 0.
    const float other_sum_exp = scale > 0.f ? scale * other.sum_exp : 0.f;
    const float other_sum_exp_shift =
        scale > 0.f ? scale * (other.sum_exp_shift + shift * other.sum_exp) : 0.f;
    RowState merged;
    merged.top1 = lead.top1;
    merged.top2 = fmaxf(lead.top2, other.top1);
    merged.sum_exp = lead.sum_exp + other_sum_exp;
    merged.sum_exp_shift = lead.sum_exp_shift + other_sum_exp_shift;
    merged.label = lead.label;
    merged.all_finite = a.all_finite & b.all_finite;
    return merged;
}

// Folds this thread's logits of one row, indices first, first + stride, ... (ascending, so the
// first index of a tie is met first and keeps the lead).
template <typename Input>
__device__ __forceinline__ RowState fold_row(const Input* __restrict__ row, int num_classes,
                                             float temperature, int first, int stride) {
    RowState state = empty_state();
    for (int index = first; index < num_classes; index += stride) {
        const float z = load_logit(row + index) / temperature;
        if (!isfinite(z)) {
            state.all_finite = 0;  // the row is invalid; its sums no longer matter
            continue;
        }
        state = merge(state, RowState{z, negative_infinity(), 1.f, 0.f, index, 1});
    }
    return state;
}

__device__ __forceinline__ RowState shuffle_xor(const RowState& state, int lane_mask) {
    RowState other;
    other.top1 = __shfl_xor_sync(kFullMask, state.top1, lane_mask);
    other.top2 = __shfl_xor_sync(kFullMask, state.top2, lane_mask);
    other.sum_exp = __shfl_xor_sync(kFullMask, state.sum_exp, lane_mask);
    other.sum_exp_shift = __shfl_xor_sync(kFullMask, state.sum_exp_shift, lane_mask);
    other.label = __shfl_xor_sync(kFullMask, state.label, lane_mask);
    other.all_finite = __shfl_xor_sync(kFullMask, state.all_finite, lane_mask);
    return other;
}

// Butterfly over the warp: every lane ends with the merge of all 32 states.
__device__ __forceinline__ RowState warp_merge(RowState state) {
    for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
        state = merge(state, shuffle_xor(state, lane_mask));
    }
    return state;
}

struct ExitRule {
    int metric;                              // kMaxProb, kEntropy, or 2 for margin
    float threshold;                         // used when class_thresholds is null
    const float* __restrict__ class_thresholds;  // (C,) indexed by the row's label, or null
    const unsigned char* __restrict__ never_exit;  // (B,) or null
};

struct Outputs {
    float* __restrict__ max_prob;
    float* __restrict__ entropy;
    float* __restrict__ margin;
    long long* __restrict__ label;
    unsigned char* __restrict__ exit_mask;
};

__device__ __forceinline__ void write_row(const RowState& state, long long row, const ExitRule& rule,
                                          const Outputs& out) {
    // sum_exp is 0 only when the row had no logit at all (C == 0, which the launcher refuses).
    if (!state.all_finite || !(state.sum_exp > 0.f)) {
        out.max_prob[row] = quiet_nan();
        out.entropy[row] = quiet_nan();
        out.margin[row] = quiet_nan();
        out.label[row] = -1;
        out.exit_mask[row] = 0;
        return;
    }
    const float max_prob = 1.f / state.sum_exp;
    const float entropy = fmaxf(logf(state.sum_exp) - state.sum_exp_shift / state.sum_exp, 0.f);
    const float margin = (1.f - expf(state.top2 - state.top1)) / state.sum_exp;  // exp(-inf) = 0 for C == 1
    out.max_prob[row] = max_prob;
    out.entropy[row] = entropy;
    out.margin[row] = margin;
    out.label[row] = state.label;

    const float value = rule.metric == kMaxProb ? max_prob : rule.metric == kEntropy ? entropy : margin;
    const float limit =
        rule.class_thresholds != nullptr ? rule.class_thresholds[state.label] : rule.threshold;
    const bool passes = rule.metric == kEntropy ? value <= limit : value >= limit;
    const bool held = rule.never_exit != nullptr && rule.never_exit[row] != 0;
    out.exit_mask[row] = passes && !held;
}

template <typename Input, bool kBlockPerRow>
__device__ __forceinline__ void confidence_rows(const Input* __restrict__ logits, int num_rows,
                                                int num_classes, float temperature, const ExitRule& rule,
                                                const Outputs& out) {
    const int threads_per_row = kBlockPerRow ? static_cast<int>(blockDim.x) : kWarpSize;
    const int rows_per_block = static_cast<int>(blockDim.x) / threads_per_row;
    const int thread = static_cast<int>(threadIdx.x);
    const long long row = static_cast<long long>(blockIdx.x) * rows_per_block + thread / threads_per_row;
    if (row >= num_rows) return;  // whole warps (or the whole block) leave together: no shuffle is left short
    const int thread_in_row = thread % threads_per_row;
    RowState state = warp_merge(
        fold_row(logits + row * num_classes, num_classes, temperature, thread_in_row, threads_per_row));
    if constexpr (kBlockPerRow) {
        __shared__ RowState warp_states[kMaxWarpsPerBlock];
        const int warp = thread / kWarpSize;
        const int lane = thread % kWarpSize;
        if (lane == 0) warp_states[warp] = state;
        __syncthreads();
        if (warp != 0) return;
        const int num_warps = static_cast<int>(blockDim.x) / kWarpSize;
        state = warp_merge(lane < num_warps ? warp_states[lane] : empty_state());
    }
    if (thread_in_row == 0) write_row(state, row, rule, out);
}

}  // namespace

// The four entry points differ only in input type and layout; one definition serves them all.
#define OFFRAMP_CONFIDENCE_ENTRY_POINT(name, Input, kBlockPerRow)                                            \
    extern "C" __global__ void __launch_bounds__(kMaxThreadsPerBlock)                                        \
        name(const Input* __restrict__ logits, int num_rows, int num_classes, float temperature, int metric, \
             float threshold, const float* __restrict__ class_thresholds,                                    \
             const unsigned char* __restrict__ never_exit, float* __restrict__ max_prob,                     \
             float* __restrict__ entropy, float* __restrict__ margin, long long* __restrict__ label,         \
             unsigned char* __restrict__ exit_mask) {                                                        \
        confidence_rows<Input, kBlockPerRow>(logits, num_rows, num_classes, temperature,                     \
                                             ExitRule{metric, threshold, class_thresholds, never_exit},      \
                                             Outputs{max_prob, entropy, margin, label, exit_mask});          \
    }

OFFRAMP_CONFIDENCE_ENTRY_POINT(confidence_warp_f32, float, false)
OFFRAMP_CONFIDENCE_ENTRY_POINT(confidence_warp_f16, unsigned short, false)
OFFRAMP_CONFIDENCE_ENTRY_POINT(confidence_block_f32, float, true)
OFFRAMP_CONFIDENCE_ENTRY_POINT(confidence_block_f16, unsigned short, true)
