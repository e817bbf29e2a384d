// The CUDA device environment on the CPU, to run the GPU backend's kernel source
// (sparsembed/_cuda/_kernels.py) compiled by the host C++ compiler: see
// tests/reference_gpu.py (CudaSourceOnCpu).
//
// A launch runs one warp at a time; its 32 lanes are cooperatively scheduled contexts
// (ucontext) on one OS thread. A lane runs until it reaches a warp collective
// (__shfl_xor_sync, __syncwarp) or returns; once every lane waits at the same
// collective the scheduler performs it and resumes them. A collective that not all 32
// lanes reach (one returned, or they wait at different ones) is reported as an error:
// on a GPU it is undefined. Warps do not run side by side, so the kernels may share
// nothing between warps but atomics (ours share only the bad-id flag's atomic max).
// Arithmetic is the host's IEEE arithmetic with no contraction (-ffp-contract=off),
// as the GPU's is with --fmad=false.
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <ucontext.h>
#include <vector>

using std::fabs;
using std::fmax;
using std::fmin;
using std::pow;
using std::sqrt;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

struct se_dim3 {
    unsigned x, y, z;
};
static se_dim3 blockIdx, threadIdx, blockDim, gridDim;

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};

namespace se_emu {

const int LANES = 32;
const size_t STACK = 256 * 1024;
enum Kind { RUNNING = 0, SHUFFLE = 1, SYNCWARP = 2 };

struct Lane {
    ucontext_t ctx;
    bool done;
    int waits_at;  // Kind
    int offset;    // __shfl_xor_sync's lane mask
    size_t size;
    unsigned char in[8], out[8];
};

static Lane lanes[LANES];
static std::vector<char> stacks(LANES * STACK);
static ucontext_t scheduler;
static int current;
static std::function<void()>* body;
static std::string error;

static void lane_entry() {
    (*body)();
    lanes[current].done = true;  // then back to the scheduler (uc_link)
}

static void wait_at(int kind) {
    lanes[current].waits_at = kind;
    swapcontext(&lanes[current].ctx, &scheduler);
}

// Run the launch grid (gx) x block (32, by): every warp in turn; "" when it completed,
// else what went wrong.
static const char* run(unsigned gx, unsigned by, std::function<void()> fn) {
    error.clear();
    body = &fn;
    gridDim = {gx, 1, 1};
    blockDim = {(unsigned)LANES, by, 1};
    for (unsigned bx = 0; bx < gx && error.empty(); ++bx) {
        for (unsigned y = 0; y < by && error.empty(); ++y) {
            for (int l = 0; l < LANES; ++l) {
                Lane& lane = lanes[l];
                getcontext(&lane.ctx);
                lane.ctx.uc_stack.ss_sp = &stacks[l * STACK];
                lane.ctx.uc_stack.ss_size = STACK;
                lane.ctx.uc_link = &scheduler;
                makecontext(&lane.ctx, lane_entry, 0);
                lane.done = false;
                lane.waits_at = RUNNING;
            }
            for (;;) {
                for (int l = 0; l < LANES; ++l) {
                    if (lanes[l].done || lanes[l].waits_at != RUNNING) continue;
                    current = l;
                    blockIdx = {bx, 0, 0};
                    threadIdx = {(unsigned)l, y, 0};
                    swapcontext(&scheduler, &lanes[l].ctx);
                }
                int waiting = 0, done = 0, kind = RUNNING;
                for (int l = 0; l < LANES; ++l) {
                    if (lanes[l].done) {
                        ++done;
                        continue;
                    }
                    ++waiting;
                    if (kind == RUNNING) kind = lanes[l].waits_at;
                    if (lanes[l].waits_at != kind) error = "lanes wait at different warp collectives";
                }
                if (waiting == 0 || !error.empty()) break;
                if (done) {
                    error = "a warp collective that not every lane reaches";
                    break;
                }
                if (kind == SHUFFLE) {
                    for (int l = 0; l < LANES; ++l) {
                        if (lanes[l].offset != lanes[0].offset || lanes[l].size != lanes[0].size)
                            error = "lanes shuffle with different offsets or types";
                        const Lane& from = lanes[l ^ (lanes[l].offset & (LANES - 1))];
                        memcpy(lanes[l].out, from.in, sizeof(from.in));
                    }
                }
                for (int l = 0; l < LANES; ++l) lanes[l].waits_at = RUNNING;
            }
        }
    }
    return error.empty() ? "" : error.c_str();
}

}  // namespace se_emu

template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int offset) {
    static_assert(sizeof(V) <= 8, "values of at most 8 bytes");
    se_emu::Lane& me = se_emu::lanes[se_emu::current];
    if (mask != 0xffffffffu) se_emu::error = "a shuffle with a partial warp mask";
    memset(me.in, 0, sizeof(me.in));
    memcpy(me.in, &v, sizeof(V));
    me.size = sizeof(V);
    me.offset = offset;
    se_emu::wait_at(se_emu::SHUFFLE);
    V r;
    memcpy(&r, se_emu::lanes[se_emu::current].out, sizeof(V));
    return r;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) se_emu::error = "__syncwarp with a partial warp mask";
    se_emu::wait_at(se_emu::SYNCWARP);
}

inline double __longlong_as_double(long long x) {
    double d;
    memcpy(&d, &x, sizeof(d));
    return d;
}

// one OS thread: the read-modify-write is atomic as it is
inline long long atomicMax(long long* address, long long v) {
    const long long old = *address;
    if (v > old) *address = v;
    return old;
}
