/* A spinning barrier for the threads of one OpenMP team.

   A kernel made of several passes runs them all in one parallel region and waits
   between them here instead of starting a parallel region per pass: with passive
   waiting (OMP_WAIT_POLICY=PASSIVE, which the benchmarks set so that torch's and our
   thread pools do not spin against each other) every region start wakes the sleeping
   workers, ~0.1 ms each on a virtual machine. Between two passes of balanced work a
   thread waits only for the others to finish theirs, so it spins (with a pause), and
   after a while yields its core in case the team has more threads than cores.

   Every thread of the team must call se_barrier_wait the same number of times with
   the team's size (omp_get_num_threads()), never the size that was asked for. */
#ifndef SPARSEMBED_SPIN_H
#define SPARSEMBED_SPIN_H

#if defined(_MSC_VER)
#include <intrin.h>
#include <windows.h>
#define SE_SPIN_PAUSE() YieldProcessor()
#define SE_SPIN_YIELD() SwitchToThread()
#else
#include <sched.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SE_SPIN_PAUSE() _mm_pause()
#else
#define SE_SPIN_PAUSE() do {} while (0)
#endif
#define SE_SPIN_YIELD() sched_yield()
#endif

/* pauses before a waiting thread starts yielding its core (~0.1-0.3 ms) */
#define SE_SPIN_PAUSES 2048

typedef struct { long arrived; long generation; } se_barrier;

static inline void se_barrier_init(se_barrier* b)
{
    b->arrived = 0;
    b->generation = 0;
}

static inline void se_barrier_wait(se_barrier* b, int team_size)
{
    long gen;
    unsigned spins = 0;
    if (team_size <= 1) return;
#if defined(_MSC_VER)
    gen = _InterlockedOr(&b->generation, 0);
    if (_InterlockedIncrement(&b->arrived) == team_size) {
        _InterlockedExchange(&b->arrived, 0);
        _InterlockedExchange(&b->generation, gen + 1);
        return;
    }
    while (_InterlockedOr(&b->generation, 0) == gen) {
        if (++spins < SE_SPIN_PAUSES) SE_SPIN_PAUSE(); else SE_SPIN_YIELD();
    }
#else
    gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == team_size) {
        /* the last one in resets the count before it lets the others go on */
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->generation, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    while (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen) {
        if (++spins < SE_SPIN_PAUSES) SE_SPIN_PAUSE(); else SE_SPIN_YIELD();
    }
#endif
}

/* The next unclaimed item of a shared counter (0, 1, 2, ... across the team), for
   work handed out as threads come free inside a parallel block. A worksharing
   prange would do it too, but Cython gives its loop variable firstprivate and
   lastprivate, for which GCC puts a barrier at the loop's start: with passive
   waiting every thread then sleeps until the last one has woken (10-17 us more per
   call, measured on a VM). */
static inline long long se_claim(long long* counter)
{
#if defined(_MSC_VER)
    return _InterlockedExchangeAdd64(counter, 1);
#else
    return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
#endif
}

#endif
