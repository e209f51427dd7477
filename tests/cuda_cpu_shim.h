// Runs bnlib.cuda's CUDA kernels on the CPU, for tests on machines without a GPU.
//
// tests/test_cuda_on_cpu.py compiles KERNEL_SOURCE (minus its #include <cuda_fp16.h>) after this
// header with g++, as ordinary C++: every CUDA thread of a block is a std::thread, __syncthreads is
// a barrier of the block's threads, a warp shuffle is an exchange through memory between the 32
// threads of a warp with a barrier on either side, and __shared__ variables are static (blocks run
// one after another, so static storage is the running block's shared memory). Threads that return
// early drop out of the barriers, as exited threads do on a GPU; a warp shuffle in a warp some of
// whose threads have exited (undefined on a GPU with a full mask) makes the launch fail (code 3).
// What this checks: the kernels' arithmetic, indexing, partial layouts, reductions and
// synchronisation structure, on real data. What it cannot check: speed, races that a CPU's memory
// model and scheduling happen to hide, the GPU memory model, and reads of shared memory a block
// never wrote (static storage keeps the previous block's values). KERNEL_SOURCE uses no atomics,
// no fences and no intrinsics but the ones below.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 { unsigned int x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

using std::sqrt;

template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }

// float16: the storage CUDA's __half has, converted with round-to-nearest-even as __float2half_rn
struct __half { unsigned short bits; };
inline float __half2float(__half h) { _Float16 v; std::memcpy(&v, &h.bits, 2); return (float)v; }
inline __half __float2half_rn(float f) { _Float16 v = (_Float16)f; __half h; std::memcpy(&h.bits, &v, 2); return h; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }

namespace emu {
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline unsigned char lanes[32][32][8];          // [warp][lane][value bytes]
inline std::atomic<int> exited[32];              // threads of each warp that have returned
inline std::atomic<bool> bad_shuffle{false};
inline unsigned int threads_per_block = 0;

inline unsigned int linear_thread() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <typename T>
inline T __shfl_down_sync(unsigned int, T value, unsigned int offset) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    const unsigned int t = emu::linear_thread(), warp = t / 32, lane = t % 32;
    std::memcpy(emu::lanes[warp][lane], &value, sizeof(T));
    emu::warp_barriers[warp]->arrive_and_wait();
    if (emu::exited[warp].load() != 0) emu::bad_shuffle = true;    // lanes gone: undefined on a GPU
    T result = value;
    if (lane + offset < 32 && t + offset < emu::threads_per_block)
        std::memcpy(&result, emu::lanes[warp][lane + offset], sizeof(T));
    emu::warp_barriers[warp]->arrive_and_wait();
    return result;
}

// Calls kernel f with its arguments read from a cuLaunchKernel-style table: params[k] points at
// the k-th argument's value.
template <typename... Args, std::size_t... I>
void emu_call_with(void (*f)(Args...), void** params, std::index_sequence<I...>) {
    f(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(params[I])...);
}
template <typename... Args>
void emu_invoke(void (*f)(Args...), void** params) {
    emu_call_with(f, params, std::index_sequence_for<Args...>{});
}

using emu_kernel = void (*)(void**);
std::map<std::string, emu_kernel>& emu_table();

// cuLaunchKernel on the CPU: one std::thread per CUDA thread of a block, created once per launch;
// the blocks run one after another, each with fresh barriers (threads that return early drop out
// of them, as exited threads do on a GPU). Returns 0, or 1 for a kernel name the table lacks, or 2
// for a block too large to emulate, or 3 when a warp shuffle ran in a warp with exited threads.
extern "C" int bn_emu_launch(const char* name, unsigned int gx, unsigned int gy, unsigned int gz,
                             unsigned int bx, unsigned int by, unsigned int bz, void** params) {
    auto it = emu_table().find(name);
    if (it == emu_table().end()) return 1;
    const unsigned int n = bx * by * bz;
    if (n == 0 || n > 1024) return 2;
    const emu_kernel kernel = it->second;
    blockDim = dim3{bx, by, bz};
    gridDim = dim3{gx, gy, gz};
    emu::threads_per_block = n;
    emu::bad_shuffle = false;
    std::barrier<> start(n + 1), done(n + 1);
    bool finished = false;
    dim3 current;
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned int t = 0; t < n; ++t)
        threads.emplace_back([&, t] {
            threadIdx = dim3{t % bx, (t / bx) % by, t / (bx * by)};
            for (;;) {
                start.arrive_and_wait();                 // the coordinator has set up the next block
                if (finished) return;
                blockIdx = current;
                kernel(params);
                emu::exited[t / 32] += 1;
                emu::warp_barriers[t / 32]->arrive_and_drop();
                emu::block_barrier->arrive_and_drop();
                done.arrive_and_wait();
            }
        });
    for (unsigned int z = 0; z < gz; ++z)
        for (unsigned int y = 0; y < gy; ++y)
            for (unsigned int x = 0; x < gx; ++x) {
                std::barrier<> block(n);
                emu::block_barrier = &block;
                emu::warp_barriers.clear();
                for (unsigned int w = 0; w < (n + 31) / 32; ++w)
                    emu::warp_barriers.emplace_back(new std::barrier<>(std::min(32u, n - 32 * w)));
                for (auto& e : emu::exited) e = 0;
                current = dim3{x, y, z};
                start.arrive_and_wait();
                done.arrive_and_wait();
            }
    finished = true;
    start.arrive_and_wait();
    for (auto& th : threads) th.join();
    return emu::bad_shuffle ? 3 : 0;
}
