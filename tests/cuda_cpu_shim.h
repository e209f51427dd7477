// Runs bnlib.cuda's CUDA kernels on the CPU, for tests on machines without a GPU.
//
// tests/test_cuda_on_cpu.py compiles KERNEL_SOURCE (minus its #include <cuda_fp16.h>) after this
// header with g++, as ordinary C++. Every CUDA thread of a block is a fiber (its own stack, switched in
// user space: a few lines of assembly on x86-64, POSIX ucontext elsewhere or with EMU_UCONTEXT defined),
// and one OS thread runs them all: a fiber runs until it reaches a barrier or returns, then the next one
// runs. __syncthreads is a barrier of the block's threads, a warp shuffle an exchange through memory
// between the 32 threads of a warp with a warp barrier on either side, and __shared__ variables are
// static (blocks run one after another, so static storage is the running block's shared memory). Threads
// that return early drop out of the barriers, as exited threads do on a GPU; a warp shuffle in a warp
// some of whose threads have exited (undefined on a GPU with a full mask) makes the launch fail with
// code 3; threads that wait at barriers of different kinds, some of a warp in a shuffle and others at
// __syncthreads, which can never all open, fail it with code 4. Like the GPU's, a barrier counts
// arrivals: two different __syncthreads calls reached by different threads pass together.
// (A first version ran one std::thread per CUDA thread: the same semantics, but 256 OS threads per
// block on a 2-core machine spent most of their time in the scheduler.)
// What this checks: the kernels' arithmetic, indexing, partial layouts, reductions and
// synchronisation structure, on real data. What it cannot check: speed, races (threads run between
// barriers one after another, in thread order or in reverse, so a missing barrier shows only where one
// of those orders exposes it), the shuffle's mask (taken as full), the GPU memory model, and reads of
// shared memory a block never wrote (static storage keeps the previous block's values). KERNEL_SOURCE
// uses no atomics, no fences and no intrinsics but the ones below.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ucontext.h>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 { unsigned int x = 1, y = 1, z = 1; };
dim3 threadIdx, blockIdx;        // the running fiber's (set before each switch to it)
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
// A fiber's saved context, and the switch between two. On x86-64 a few lines of assembly save and restore
// the callee-saved registers and the stack pointer (what a function call must preserve; the kernels change
// no floating-point control state); elsewhere POSIX swapcontext, which also saves the signal mask with a
// system call per switch.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(".text\n.globl emu_switch\n.hidden emu_switch\n.type emu_switch, @function\nemu_switch:\n"
    "    pushq %rbp\n    pushq %rbx\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
    "    movq %rsp, (%rdi)\n    movq %rsi, %rsp\n"
    "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbx\n    popq %rbp\n    ret\n"
    ".size emu_switch, .-emu_switch\n");
struct Context { void* sp = nullptr; };
inline void switch_to(Context& from, Context& to) { emu_switch(&from.sp, to.sp); }
#else
struct Context { ucontext_t uc; };
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// The state below is global. The tests load a dozen builds of this header into one process (the kernels,
// their mutants, the probes); GCC gives C++17 inline variables one instance per process ("unique" symbols)
// even across libraries loaded privately, so those builds share it: harmless while they come from the same
// header (one layout) and no two launches overlap. A build with another Context (EMU_UCONTEXT) must not be
// loaded beside them.
enum class State { ready, at_block_barrier, at_warp_barrier, done };
struct Fiber {
    Context context;
    State state = State::ready;
    dim3 index;
};
inline std::vector<Fiber> fibers;
inline std::vector<std::unique_ptr<char[]>> stacks;
constexpr std::size_t stack_bytes = 64 * 1024;
inline Context scheduler;
inline Fiber* running = nullptr;
inline unsigned char lanes[32][32][8];          // [warp][lane][value bytes]
inline int exited[32];                          // threads of each warp that have returned
inline bool bad_shuffle = false;
inline unsigned int threads_per_block = 0;
inline void (*kernel)(void**) = nullptr;
inline void** params = nullptr;

inline unsigned int linear_thread() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// The running fiber waits at a barrier: back to the scheduler, which resumes it once the barrier opens.
inline void wait_at(State barrier) {
    Fiber* self = running;
    self->state = barrier;
    switch_to(self->context, scheduler);
}

// A fiber's whole life: the kernel, then back to the scheduler for good.
extern "C" inline void emu_fiber_main() {
    kernel(params);
    exited[linear_thread() / 32] += 1;             // threadIdx is still this fiber's
    running->state = State::done;
    switch_to(running->context, scheduler);
    __builtin_unreachable();                    // a done fiber is never resumed
}

// Make `f` start at emu_fiber_main on `stack` at its next switch_to.
inline void prepare(Fiber& f, char* stack) {
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
    auto top = reinterpret_cast<std::uintptr_t>(stack + stack_bytes) & ~std::uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top) - 2;        // the return address 16-byte aligned, as after a call
    sp[0] = reinterpret_cast<void*>(&emu_fiber_main);     // where emu_switch's ret goes
    sp[1] = nullptr;
    sp -= 6;                                              // the six registers emu_switch pops
    for (int k = 0; k < 6; ++k) sp[k] = nullptr;
    f.context.sp = sp;
#else
    getcontext(&f.context.uc);
    f.context.uc.uc_stack.ss_sp = stack;
    f.context.uc.uc_stack.ss_size = stack_bytes;
    f.context.uc.uc_link = nullptr;                       // emu_fiber_main never returns
    makecontext(&f.context.uc, emu_fiber_main, 0);
#endif
}
}  // namespace emu

inline void __syncthreads() { emu::wait_at(emu::State::at_block_barrier); }

template <typename T>
inline T __shfl_down_sync(unsigned int, T value, unsigned int offset) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    const unsigned int t = emu::linear_thread(), warp = t / 32, lane = t % 32;
    std::memcpy(emu::lanes[warp][lane], &value, sizeof(T));
    emu::wait_at(emu::State::at_warp_barrier);
    if (emu::exited[warp] != 0) emu::bad_shuffle = true;     // lanes gone: undefined on a GPU
    T result = value;
    if (lane + offset < 32 && t + offset < emu::threads_per_block)
        std::memcpy(&result, emu::lanes[warp][lane + offset], sizeof(T));
    emu::wait_at(emu::State::at_warp_barrier);
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

namespace emu {
// One block: every fiber runs until it waits or returns (in thread order, or in reverse order, which
// blocks alternate, so that a missing barrier shows whichever thread reads what another writes); then a
// warp barrier opens when every live thread of its warp waits at it, and the block barrier when every
// live thread of the block does.
// Returns false when some threads wait and no barrier can open (a barrier not all threads reach).
inline bool run_block(unsigned int n, bool descending) {
    for (unsigned int t = 0; t < n; ++t) {
        prepare(fibers[t], stacks[t].get());
        fibers[t].state = State::ready;
    }
    for (auto& e : exited) e = 0;
    for (;;) {
        for (unsigned int k = 0; k < n; ++k) {
            Fiber& f = fibers[descending ? n - 1 - k : k];
            if (f.state != State::ready) continue;
            running = &f;
            threadIdx = f.index;
            switch_to(scheduler, f.context);
        }
        bool live = false, opened = false, all_at_block = true;
        for (unsigned int w = 0; 32 * w < n; ++w) {
            bool waiting = false, all_waiting = true;
            for (unsigned int t = 32 * w; t < std::min(n, 32 * w + 32); ++t) {
                const State s = fibers[t].state;
                if (s == State::done) continue;
                live = true;
                all_at_block = all_at_block && s == State::at_block_barrier;
                waiting = waiting || s == State::at_warp_barrier;
                all_waiting = all_waiting && s == State::at_warp_barrier;
            }
            if (waiting && all_waiting) {
                for (unsigned int t = 32 * w; t < std::min(n, 32 * w + 32); ++t)
                    if (fibers[t].state == State::at_warp_barrier) fibers[t].state = State::ready;
                opened = true;
            }
        }
        if (!live) return true;
        if (!opened && all_at_block) {
            for (unsigned int t = 0; t < n; ++t)
                if (fibers[t].state == State::at_block_barrier) fibers[t].state = State::ready;
            opened = true;
        }
        if (!opened) return false;
    }
}
}  // namespace emu

// cuLaunchKernel on the CPU: one fiber per CUDA thread of a block, the blocks one after another.
// Returns 0, or 1 for a kernel name the table lacks, 2 for a block too large to emulate, 3 when a warp
// shuffle ran in a warp with exited threads, 4 when a block's threads wait at barriers that cannot open.
extern "C" int bn_emu_launch(const char* name, unsigned int gx, unsigned int gy, unsigned int gz,
                             unsigned int bx, unsigned int by, unsigned int bz, void** params) {
    auto it = emu_table().find(name);
    if (it == emu_table().end()) return 1;
    const unsigned int n = bx * by * bz;
    if (n == 0 || n > 1024) return 2;
    blockDim = dim3{bx, by, bz};
    gridDim = dim3{gx, gy, gz};
    emu::threads_per_block = n;
    emu::bad_shuffle = false;
    emu::kernel = it->second;
    emu::params = params;
    emu::fibers.assign(n, emu::Fiber{});
    while (emu::stacks.size() < n) emu::stacks.emplace_back(new char[emu::stack_bytes]);
    for (unsigned int t = 0; t < n; ++t) emu::fibers[t].index = dim3{t % bx, (t / bx) % by, t / (bx * by)};
    for (unsigned int z = 0; z < gz; ++z)
        for (unsigned int y = 0; y < gy; ++y)
            for (unsigned int x = 0; x < gx; ++x) {
                blockIdx = dim3{x, y, z};
                if (!emu::run_block(n, (x + y + z) % 2 == 1)) return 4;
            }
    return emu::bad_shuffle ? 3 : 0;
}
