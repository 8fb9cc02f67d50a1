// cuda_shim.h: compile a CUDA C source with g++ and run its kernels on the CPU, one fiber per CUDA
// thread, so that the very .cu file the GPU runs can be checked against a NumPy reference on a
// machine without a GPU. The Python side (tests/cuda_shim/__init__.py) builds a source with
// `-include cuda_shim.h` plus one SHIM_EXPORT_KERNEL(name) line per entry point, and launches
// through ctypes with cuLaunchKernel-style parameters (an array of pointers to each argument).
//
// What it models:
//   - the thread hierarchy: gridDim, blockIdx, blockDim, threadIdx (x, y, z), warps of 32
//     consecutive linear thread ids as on hardware, warpSize;
//   - each CUDA thread as a fiber (ucontext) with its own stack. The threads of a block interleave
//     at synchronisation points only (no preemption), in an order chosen per launch: forward,
//     reversed, or a seeded shuffle redrawn at every scheduling round. Blocks run one after the
//     other, in the same kind of order;
//   - __syncthreads() and __syncwarp(mask) as real rendezvous;
//   - __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync as a two-phase exchange:
//     every lane named by the mask publishes its value, rendezvous, every lane reads its source
//     lane's value, rendezvous. A lane therefore reads what its source held at that very shuffle,
//     whatever order the fibers run in;
//   - checks that fail the launch with a message instead of hanging or returning garbage: all
//     threads meeting at a rendezvous come from the same intrinsic on the same source line with the
//     same mask; a shuffle reads a lane inside its mask; no participant has exited; a rendezvous
//     that can never complete (a deadlock) is reported with where each thread waits;
//   - __shared__ as static storage: one block runs at a time, so one copy serves every block.
//
// What it does NOT cover:
//   - data races: threads run one at a time between sync points, so a race shows up only if it
//     changes a result under one of the schedules tried; there is no race detector;
//   - the memory model: no caches, no visibility delays, no fences, no atomics; global and shared
//     memory are plain host memory, every write is visible at once;
//   - concurrency between blocks: blocks never overlap, so inter-block protocols (atomic look-back
//     scans, grid-wide sync) are not exercised, and blocks never wait for each other;
//   - timing, occupancy, register use, spills, bank conflicts, coalescing: nothing about speed
//     (the NVRTC test checks registers and spills);
//   - warp divergence beyond the checks above: lanes interleave at sync points, lockstep execution
//     and reconvergence are not modelled;
//   - out-of-bounds or misaligned accesses: memory is unchecked (the tests put guard bytes around
//     outputs, and each launch runs in a forked child, so a fault fails the launch, not the tests);
//     shared memory keeps its values from one block to the next instead of being undefined;
//   - floating point: host expf/logf (glibc, < 1 ulp) and no FMA contraction (x86-64 baseline),
//     where the GPU uses CUDA's math library (expf, logf within 2 ulp) and contracts a * b + c into
//     FMA by default; results differ in the last bits and tests state tolerances for that;
//   - shuffle widths other than 32, dynamic shared memory, atomics, streams, cooperative groups,
//     textures, printf ordering, and any intrinsic not defined below (the build fails on those).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

using std::isfinite;
using std::max;
using std::min;

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace cuda_shim {

constexpr int kWarpSize = 32;
constexpr std::size_t kStackBytes = 256 * 1024;  // per fiber, committed only as touched

enum Schedule : int { kForward = 0, kReverse = 1, kShuffled = 2 };

// Mirrored by the ctypes structure in __init__.py.
struct LaunchConfig {
    dim3 grid;
    dim3 block;
    int schedule;
    unsigned int seed;
};

// One synchronisation point in progress for a group of threads (a warp or a block).
struct Rendezvous {
    const char* intrinsic = nullptr;  // of the first arrival; later arrivals must match
    int line = 0;
    unsigned int mask = 0;
    int arrived = 0;
    unsigned long long generation = 0;  // advanced by the last arrival, which releases the others
};

struct Fiber {
    ucontext_t context;
    char* stack = nullptr;  // lowest page is a guard page, so an overflow faults instead of corrupting
    dim3 thread_idx;
    int linear_id = 0;
    bool finished = false;
    const Rendezvous* waiting_on = nullptr;
    unsigned long long waiting_generation = 0;
};

struct WarpExchange {
    Rendezvous rendezvous;
    std::uint64_t slots[kWarpSize];  // values published by each lane in phase one of a shuffle
};

struct BlockRun {
    std::vector<Fiber> fibers;
    std::vector<WarpExchange> warps;
    Rendezvous block_barrier;
    ucontext_t scheduler;
    Fiber* current = nullptr;
    std::function<void()> body;
    std::string error;
};

struct LaunchState {
    dim3 grid_dim, block_dim, block_idx;
    BlockRun* block = nullptr;
};

inline LaunchState& state() {
    static LaunchState launch_state;
    return launch_state;
}

inline std::string& last_error() {
    static std::string error;
    return error;
}

inline Fiber& this_fiber() { return *state().block->current; }

// Leaves the current fiber for good: the scheduler sees the error and abandons the launch.
[[noreturn]] inline void fail(const std::string& message) {
    BlockRun& block = *state().block;
    const dim3& b = state().block_idx;
    const dim3& t = this_fiber().thread_idx;
    block.error = message + " (block " + std::to_string(b.x) + "," + std::to_string(b.y) + "," +
                  std::to_string(b.z) + " thread " + std::to_string(t.x) + "," + std::to_string(t.y) +
                  "," + std::to_string(t.z) + ")";
    swapcontext(&this_fiber().context, &block.scheduler);
    __builtin_unreachable();
}

// Arrives at `rendezvous` with the threads whose linear ids are `participants`, and returns once all
// of them have arrived. Threads yield to the scheduler while they wait.
inline void arrive(Rendezvous& rendezvous, const char* intrinsic, int line, unsigned int mask,
                   const std::vector<int>& participants) {
    BlockRun& block = *state().block;
    if (rendezvous.arrived == 0) {
        for (int id : participants) {
            if (block.fibers[id].finished) {
                fail(std::string(intrinsic) + " at line " + std::to_string(line) + ": thread " +
                     std::to_string(id) + " of the group has already exited");
            }
        }
        rendezvous.intrinsic = intrinsic;
        rendezvous.line = line;
        rendezvous.mask = mask;
    } else if (std::strcmp(rendezvous.intrinsic, intrinsic) != 0 || rendezvous.line != line ||
               rendezvous.mask != mask) {
        fail(std::string(intrinsic) + " at line " + std::to_string(line) + " met " + rendezvous.intrinsic +
             " at line " + std::to_string(rendezvous.line) + " (divergent synchronisation)");
    }
    if (++rendezvous.arrived == static_cast<int>(participants.size())) {
        rendezvous.arrived = 0;
        ++rendezvous.generation;
        return;
    }
    Fiber& self = this_fiber();
    self.waiting_on = &rendezvous;
    self.waiting_generation = rendezvous.generation;
    swapcontext(&self.context, &block.scheduler);
}

inline int lane_id() { return this_fiber().linear_id % kWarpSize; }

inline WarpExchange& this_warp() { return state().block->warps[this_fiber().linear_id / kWarpSize]; }

// Linear ids of the lanes of this warp named by `mask`; every one of them must exist.
inline std::vector<int> warp_participants(const char* intrinsic, int line, unsigned int mask) {
    const int warp_base = this_fiber().linear_id - lane_id();
    const int block_size = static_cast<int>(state().block->fibers.size());
    if ((mask >> lane_id() & 1u) == 0) {
        fail(std::string(intrinsic) + " at line " + std::to_string(line) + ": calling lane not in mask");
    }
    std::vector<int> participants;
    for (int lane = 0; lane < kWarpSize; ++lane) {
        if (mask >> lane & 1u) {
            if (warp_base + lane >= block_size) {
                fail(std::string(intrinsic) + " at line " + std::to_string(line) + ": mask names lane " +
                     std::to_string(lane) + ", which does not exist in this block");
            }
            participants.push_back(warp_base + lane);
        }
    }
    return participants;
}

inline void sync_warp(int line, unsigned int mask = 0xffffffffu) {
    arrive(this_warp().rendezvous, "__syncwarp", line, mask, warp_participants("__syncwarp", line, mask));
}

inline void sync_threads(int line) {
    static std::vector<int> everyone;  // 0 .. block size - 1
    const int block_size = static_cast<int>(state().block->fibers.size());
    if (static_cast<int>(everyone.size()) != block_size) {
        everyone.resize(block_size);
        std::iota(everyone.begin(), everyone.end(), 0);
    }
    arrive(state().block->block_barrier, "__syncthreads", line, 0, everyone);
}

// The two-phase exchange behind every shuffle; `source_lane` is where this lane reads from.
template <typename T>
T shuffle(const char* intrinsic, int line, unsigned int mask, T value, int source_lane, int width) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t) && std::is_trivially_copyable_v<T>,
                  "shuffles move 32- and 64-bit values");
    if (width != kWarpSize) fail(std::string(intrinsic) + ": only width 32 is modelled");
    const std::vector<int> participants = warp_participants(intrinsic, line, mask);
    if ((mask >> source_lane & 1u) == 0) {
        fail(std::string(intrinsic) + " at line " + std::to_string(line) + ": reads lane " +
             std::to_string(source_lane) + ", outside the mask (undefined)");
    }
    WarpExchange& warp = this_warp();
    std::memcpy(&warp.slots[lane_id()], &value, sizeof(T));
    arrive(warp.rendezvous, intrinsic, line, mask, participants);  // every lane has published
    T result;
    std::memcpy(&result, &warp.slots[source_lane], sizeof(T));
    arrive(warp.rendezvous, intrinsic, line, mask, participants);  // every lane has read
    return result;
}

template <typename T>
T shfl(int line, unsigned int mask, T value, int source_lane, int width = kWarpSize) {
    return shuffle("__shfl_sync", line, mask, value, source_lane % kWarpSize, width);
}

template <typename T>
T shfl_up(int line, unsigned int mask, T value, unsigned int delta, int width = kWarpSize) {
    const int source = lane_id() - static_cast<int>(delta);
    return shuffle("__shfl_up_sync", line, mask, value, source >= 0 ? source : lane_id(), width);
}

template <typename T>
T shfl_down(int line, unsigned int mask, T value, unsigned int delta, int width = kWarpSize) {
    const int source = lane_id() + static_cast<int>(delta);
    return shuffle("__shfl_down_sync", line, mask, value, source < kWarpSize ? source : lane_id(), width);
}

template <typename T>
T shfl_xor(int line, unsigned int mask, T value, int lane_mask, int width = kWarpSize) {
    return shuffle("__shfl_xor_sync", line, mask, value, (lane_id() ^ lane_mask) % kWarpSize, width);
}

inline bool runnable(const Fiber& fiber) {
    return !fiber.finished &&
           (fiber.waiting_on == nullptr || fiber.waiting_on->generation != fiber.waiting_generation);
}

inline void fiber_main() {
    BlockRun& block = *state().block;
    block.body();
    block.current->finished = true;  // uc_link returns to the scheduler
}

// `count` indices in the order of `schedule`; a shuffled order is redrawn at every call.
inline std::vector<int> schedule_order(int count, int schedule, std::mt19937& random) {
    std::vector<int> order(count);
    std::iota(order.begin(), order.end(), 0);
    if (schedule == kReverse) std::reverse(order.begin(), order.end());
    if (schedule == kShuffled) std::shuffle(order.begin(), order.end(), random);
    return order;
}

inline std::string describe_waits(const BlockRun& block) {
    std::string text;
    int listed = 0;
    for (const Fiber& fiber : block.fibers) {
        if (fiber.finished || listed == 8) continue;
        text += " thread " + std::to_string(fiber.linear_id) + " waits in " +
                (fiber.waiting_on ? std::string(fiber.waiting_on->intrinsic) + " at line " +
                                        std::to_string(fiber.waiting_on->line)
                                  : std::string("nothing"));
        ++listed;
    }
    return text;
}

// Runs every thread of the current block to completion; returns false with block.error set on failure.
inline bool run_block(BlockRun& block, int schedule, std::mt19937& random) {
    for (Fiber& fiber : block.fibers) {
        fiber.finished = false;
        fiber.waiting_on = nullptr;
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = fiber.stack + getpagesize();
        fiber.context.uc_stack.ss_size = kStackBytes;
        fiber.context.uc_link = &block.scheduler;
        makecontext(&fiber.context, fiber_main, 0);
    }
    for (;;) {
        bool progressed = false, all_finished = true;
        for (int index : schedule_order(static_cast<int>(block.fibers.size()), schedule, random)) {
            Fiber& fiber = block.fibers[index];
            if (!runnable(fiber)) {
                all_finished = all_finished && fiber.finished;
                continue;
            }
            fiber.waiting_on = nullptr;
            block.current = &fiber;
            swapcontext(&block.scheduler, &fiber.context);
            if (!block.error.empty()) return false;
            progressed = true;
            all_finished = all_finished && fiber.finished;
        }
        if (all_finished) return true;
        if (!progressed) {
            block.error = "deadlock:" + describe_waits(block);
            return false;
        }
    }
}

inline int run_grid(const LaunchConfig& config, std::function<void()> body) {
    const dim3 grid = config.grid, block_dim = config.block;
    const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
    const int blocks = static_cast<int>(grid.x * grid.y * grid.z);
    if (threads <= 0 || threads > 1024 || blocks <= 0) {
        last_error() = "invalid launch: " + std::to_string(blocks) + " blocks of " + std::to_string(threads) +
                       " threads";
        return 1;
    }
    BlockRun block;
    block.body = std::move(body);
    block.fibers.resize(threads);
    block.warps.resize((threads + kWarpSize - 1) / kWarpSize);
    const std::size_t mapping_bytes = kStackBytes + getpagesize();
    for (int id = 0; id < threads; ++id) {
        Fiber& fiber = block.fibers[id];
        fiber.linear_id = id;
        const unsigned int linear = id;
        fiber.thread_idx = {linear % block_dim.x, linear / block_dim.x % block_dim.y,
                            linear / (block_dim.x * block_dim.y)};
        void* mapping = mmap(nullptr, mapping_bytes, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        fiber.stack = static_cast<char*>(mapping);
        mprotect(mapping, getpagesize(), PROT_NONE);
    }
    LaunchState& launch = state();
    launch.grid_dim = grid;
    launch.block_dim = block_dim;
    launch.block = &block;
    std::mt19937 random(config.seed);
    int status = 0;
    for (int index : schedule_order(blocks, config.schedule, random)) {
        launch.block_idx = {index % grid.x, index / grid.x % grid.y, index / (grid.x * grid.y)};
        if (!run_block(block, config.schedule, random)) {
            last_error() = block.error;
            status = 1;
            break;
        }
    }
    for (Fiber& fiber : block.fibers) munmap(fiber.stack, mapping_bytes);
    launch.block = nullptr;
    return status;
}

// Copies the arguments out of cuLaunchKernel-style `params` (as a launch does) and runs the grid.
template <typename... Params, std::size_t... Index>
int launch_with_params(const LaunchConfig& config, void (*kernel)(Params...), void** params,
                       std::index_sequence<Index...>) {
    std::tuple<std::decay_t<Params>...> arguments{*static_cast<std::decay_t<Params>*>(params[Index])...};
    return run_grid(config, [kernel, &arguments] { std::apply(kernel, arguments); });
}

template <typename... Params>
int launch(const LaunchConfig& config, void (*kernel)(Params...), void** params) {
    return launch_with_params(config, kernel, params, std::index_sequence_for<Params...>{});
}

// Writes each parameter's size, so that the caller can check its argument list; returns the count.
template <typename... Params>
int parameter_sizes(void (*)(Params...), int* sizes) {
    const int known[] = {static_cast<int>(sizeof(std::decay_t<Params>))..., 0};
    std::copy(known, known + sizeof...(Params), sizes);
    return static_cast<int>(sizeof...(Params));
}

}  // namespace cuda_shim

#define threadIdx (::cuda_shim::this_fiber().thread_idx)
#define blockIdx (::cuda_shim::state().block_idx)
#define blockDim (::cuda_shim::state().block_dim)
#define gridDim (::cuda_shim::state().grid_dim)
#define warpSize (::cuda_shim::kWarpSize)

// The intrinsics take the source line, so that threads meeting at a rendezvous can be checked to
// have come from the same call.
#define __syncthreads() ::cuda_shim::sync_threads(__LINE__)
#define __syncwarp(...) ::cuda_shim::sync_warp(__LINE__, ##__VA_ARGS__)
#define __shfl_sync(...) ::cuda_shim::shfl(__LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_shim::shfl_up(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_shim::shfl_down(__LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_shim::shfl_xor(__LINE__, __VA_ARGS__)

inline float __int_as_float(int bits) { return std::bit_cast<float>(bits); }
inline int __float_as_int(float value) { return std::bit_cast<int>(value); }
inline float __uint_as_float(unsigned int bits) { return std::bit_cast<float>(bits); }
inline unsigned int __float_as_uint(float value) { return std::bit_cast<unsigned int>(value); }

// One line per kernel entry point, after the .cu source: the exported launcher and its parameter sizes.
#define SHIM_EXPORT_KERNEL(name)                                                                      \
    extern "C" int shim_launch_##name(const ::cuda_shim::LaunchConfig* config, void** params) {      \
        return ::cuda_shim::launch(*config, name, params);                                             \
    }                                                                                                  \
    extern "C" int shim_parameter_sizes_##name(int* sizes) {                                                \
        return ::cuda_shim::parameter_sizes(name, sizes);                                                  \
    }

extern "C" const char* shim_last_error() { return ::cuda_shim::last_error().c_str(); }
