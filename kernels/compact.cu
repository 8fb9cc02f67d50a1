// Row compaction between exits: a stable partition of the batch by its exit mask, and row copies
// (gather into a dense buffer, scatter to given rows) for tensors of any dtype and row width.
//
// The contract and the NumPy reference live in compact.py; the launchers are in cuda.py.
//
// partition_rows: ONE block (grid (1,), blockDim.x a multiple of 32, at most 1024) for the whole
//   batch. exit_mask (B,) uint8, nonzero = the row exits here. Writes, in ascending row order,
//   survivor_rows[0 : S] and exited_rows[0 : B - S] ((B,) int64 each; entries from there on are
//   left as they were) and counts (2,) int32 = [S, B - S]. Each thread takes a contiguous chunk of
//   ceil(B / blockDim.x) rows, so one block serves any B below 2^31: a single block needs no
//   inter-block protocol, and the mask is B bytes, but the work runs on one SM, which suits serving
//   batches (thousands of rows) and would be slow for millions.
//
// gather_rows_b{1,2,4,8,16}:  dst[j] = src[rows[j]] for j < *count;
// scatter_rows_b{1,2,4,8,16}: dst[dst_rows[j]] = src[src_rows[j]] for j < *count (src[j] when
//   src_rows is null). src and dst must not overlap.
//   Rows are units_per_row units of 1, 2, 4, 8 or 16 bytes (the suffix; the launcher takes the widest
//   that divides the row and both base addresses), so any tensor with the batch as its first axis goes
//   through the same kernels. *count lives in device memory (e.g. partition_rows' counts), so a launch
//   sized for the most rows needs no host synchronisation. blockDim.x a multiple of 32; a warp per row.

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxWarpsPerBlock = kMaxThreadsPerBlock / kWarpSize;
constexpr unsigned int kFullMask = 0xffffffffu;

__device__ __forceinline__ int warp_inclusive_sum(int value) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
        const int lower = __shfl_up_sync(kFullMask, value, offset);
        if (lane >= offset) value += lower;
    }
    return value;
}

// Sum of `value` over the threads of the block before this one (in threadIdx.x order), and the total.
__device__ __forceinline__ int block_exclusive_sum(int value, int& total) {
    __shared__ int warp_offsets[kMaxWarpsPerBlock];
    __shared__ int block_total;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int num_warps = static_cast<int>(blockDim.x) / kWarpSize;
    const int inclusive = warp_inclusive_sum(value);
    if (lane == kWarpSize - 1) warp_offsets[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {  // scans the warp sums in place: lane i reads and writes slot i only
        const int warp_sum = lane < num_warps ? warp_offsets[lane] : 0;
        const int warp_inclusive = warp_inclusive_sum(warp_sum);
        if (lane < num_warps) warp_offsets[lane] = warp_inclusive - warp_sum;
        if (lane == kWarpSize - 1) block_total = warp_inclusive;
    }
    __syncthreads();
    total = block_total;
    return warp_offsets[warp] + inclusive - value;
}

// Bytes moved per thread step by the widest copy kernels (one 128-bit load and store).
struct alignas(16) Bytes16 {
    unsigned long long low, high;
};

// dst[to(j)] = src[from(j)] for j < *count, where a null index array is the identity. A warp per
// row (grid-stride over rows), its lanes striding over the row's units: coalesced, and no division.
template <typename Unit>
__device__ __forceinline__ void copy_rows(const Unit* __restrict__ src,
                                          const long long* __restrict__ src_rows, Unit* __restrict__ dst,
                                          const long long* __restrict__ dst_rows,
                                          const int* __restrict__ count, long long units_per_row) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const long long warps_per_block = blockDim.x / kWarpSize;
    const long long warps_in_grid = gridDim.x * warps_per_block;
    const long long num_rows = *count;
    for (long long j = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; j < num_rows;
         j += warps_in_grid) {
        const Unit* from = src + (src_rows != nullptr ? src_rows[j] : j) * units_per_row;
        Unit* to = dst + (dst_rows != nullptr ? dst_rows[j] : j) * units_per_row;
        for (long long unit = lane; unit < units_per_row; unit += kWarpSize) to[unit] = from[unit];
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kMaxThreadsPerBlock)
    partition_rows(const unsigned char* __restrict__ exit_mask, int num_rows,
                   long long* __restrict__ survivor_rows, long long* __restrict__ exited_rows,
                   int* __restrict__ counts) {
    const int threads = static_cast<int>(blockDim.x);
    const int chunk = num_rows / threads + (num_rows % threads != 0);  // ceil, without overflow near 2^31
    // In 64 bits: threadIdx.x * chunk may pass num_rows by up to a chunk.
    const int begin = static_cast<int>(min(static_cast<long long>(threadIdx.x) * chunk, 0LL + num_rows));
    const int end = static_cast<int>(min(0LL + begin + chunk, 0LL + num_rows));
    int survivors = 0;
    for (int row = begin; row < end; ++row) survivors += exit_mask[row] == 0;
    int total_survivors;
    int survivors_before = block_exclusive_sum(survivors, total_survivors);
    for (int row = begin; row < end; ++row) {
        if (exit_mask[row] == 0) {
            survivor_rows[survivors_before++] = row;
        } else {
            exited_rows[row - survivors_before] = row;  // rows before this one, less the survivors among them
        }
    }
    if (threadIdx.x == 0) {
        counts[0] = total_survivors;
        counts[1] = num_rows - total_survivors;
    }
}

// The ten copy entry points differ only in unit width; one definition serves them all.
#define OFFRAMP_ROW_COPY_ENTRY_POINTS(suffix, Unit)                                                          \
    extern "C" __global__ void gather_rows_##suffix(const Unit* __restrict__ src,                            \
                                                    const long long* __restrict__ rows,                      \
                                                    const int* __restrict__ count, long long units_per_row,  \
                                                    Unit* __restrict__ dst) {                                \
        copy_rows(src, rows, dst, nullptr, count, units_per_row);                                            \
    }                                                                                                        \
    extern "C" __global__ void scatter_rows_##suffix(                                                        \
        const Unit* __restrict__ src, const long long* __restrict__ src_rows,                                \
        const long long* __restrict__ dst_rows, const int* __restrict__ count, long long units_per_row,      \
        Unit* __restrict__ dst) {                                                                            \
        copy_rows(src, src_rows, dst, dst_rows, count, units_per_row);                                       \
    }

OFFRAMP_ROW_COPY_ENTRY_POINTS(b1, unsigned char)
OFFRAMP_ROW_COPY_ENTRY_POINTS(b2, unsigned short)
OFFRAMP_ROW_COPY_ENTRY_POINTS(b4, unsigned int)
OFFRAMP_ROW_COPY_ENTRY_POINTS(b8, unsigned long long)
OFFRAMP_ROW_COPY_ENTRY_POINTS(b16, Bytes16)
