"""The artifact's own thread pool for parallel loops, in place of TVM's.

TVM's generated code runs a parallel loop by calling `__TVMBackendParallelLaunch`, a function pointer the
loader fills in with TVM's pool. That pool splits the loop statically, one chunk per worker, pins each worker to
a core, and the caller waits until every worker has run its chunk. Where another process wants a core (a server
beside other work, a shared CI host) a worker that is not scheduled stalls every kernel for a scheduler time
slice: with one busy process on the second of 2 cores, ShuffleNet (93 kernels) took 244-368 ms a run against
ONNX Runtime's 15 ms.

This pool is compiled into each artifact and installed by the runtime at load (`kiln_pool`). A launch gives each
thread a home block of the loop (TVM's static split) and cuts each block into k equal chunks, where k ≤ 4 and
k * threads divides every parallel extent of the kernel (the entry sets `kiln_loop_gcd` before each kernel;
k = 1 when it does not divide, since TVM's lambda splits by ceil(extent / chunks) and would leave chunks uneven).
Each thread claims the chunks of its own block first, so consecutive kernels give a thread the same part of the
data (what it wrote is still in its cache: claiming from one shared counter instead made ShuffleNet's
memory-bound kernels 25% slower), then claims what other blocks have left. The caller waits only for chunks
that were claimed: a worker that wakes late finds its block taken and touches nothing, and a thread slowed
mid-loop (a vCPU shared with another guest) is helped with the rest of its block. With that busy process,
ShuffleNet took 11-16 ms (ONNX Runtime 13-16 ms). On this loaded 2-vCPU VM, k ≤ 4 against one chunk a thread, the
same Model alternating in one process (per-round medians): MobileNetV2 0.91-0.98x, BERT layer 0.93-0.99x,
ResNet-50 0.90-1.00x, SqueezeNet and ShuffleNet 0.99-1.02x; k ≤ 8 and 16 were no better.

A launch while another is in flight on the same pool (two runs of one Model on two threads), or from inside a
worker, runs inline on its caller. Workers spin for a while after each job (launches within a run follow each
other within microseconds), then sleep on a condition variable. The pool stops its threads when the library
is unloaded and forgets them in a forked child.
"""

from __future__ import annotations

import math

POOL_SYMBOL = "kiln_pool"  # kiln_pool(threads[, chunks_per_thread, spin_us, cap]) -> the previous threads

POOL_SOURCE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <tvm/ffi/c_api.h>

/* glibc 2.34 moved the pthread functions into libc under a new symbol version; bind the old one, which every
   glibc since 2.2.5 (x86-64) or 2.17 (aarch64) has, so an artifact built here loads on older systems too. */
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 34)
#if defined(__x86_64__)
#define KILN_GLIBC_BASE "GLIBC_2.2.5"
#elif defined(__aarch64__)
#define KILN_GLIBC_BASE "GLIBC_2.17"
#endif
#ifdef KILN_GLIBC_BASE
__asm__(".symver pthread_create,pthread_create@" KILN_GLIBC_BASE);
__asm__(".symver pthread_join,pthread_join@" KILN_GLIBC_BASE);
#endif
#endif

#define KILN_MAX_WORKERS 255

typedef struct { void* sync_handle; int32_t num_task; } KilnParallelEnv;
typedef int (*KilnLambda)(int task_id, KilnParallelEnv* penv, void* cdata);
typedef int (*KilnLaunch)(KilnLambda flambda, void* cdata, int num_task);

/* Defined (weak) by TVM's generated code when any kernel has a parallel loop; absent otherwise. A kernel that
   synchronizes its parallel tasks (a barrier) needs TVM's pool, where every task runs at once: this pool would run
   them one after another and such a kernel would read what its other tasks have not written yet. */
extern void* __TVMBackendParallelLaunch __attribute__((weak));
extern void* __TVMBackendParallelBarrier __attribute__((weak));

static KilnLaunch tvm_launch;  /* TVM's pool, as the loader set it */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pthread_t workers[KILN_MAX_WORKERS];
static uint64_t worker_seen[KILN_MAX_WORKERS];
static int n_started;                  /* worker threads running (under pool_lock) */
static atomic_int pool_threads = 1;    /* threads a launch uses, the caller included */
static atomic_int chunks_per_thread = 4;  /* at most; see kiln_loop_gcd */
static atomic_int spin_us = 1000;
static atomic_int sleepers;
static atomic_int quitting;
static atomic_flag busy = ATOMIC_FLAG_INIT;  /* a launch is in flight */
static __thread int in_worker;
static __thread int thread_cap;        /* threads this caller's launches may use; 0: no cap */
/* Set by the entry before each kernel: the gcd of the kernel's parallel loop extents (0: unknown). A launch
   splits each thread's block into k chunks only where k * threads divides it, so every chunk is the same size. */
static __thread int kiln_loop_gcd;

/* One claim counter per home block, each on its own cache line: generation << 32 | next unclaimed chunk. */
typedef struct { _Atomic uint64_t word; char pad[56]; } KilnCounter;
static KilnCounter homes[KILN_MAX_WORKERS + 1];

static struct {
  _Atomic uint64_t gen;                /* the job's generation, published last */
  _Atomic(KilnLambda) f;
  _Atomic(void*) cdata;
  atomic_int per_home;                 /* chunks in each home block */
  atomic_int n_homes;                  /* the caller's and each joining worker's */
  atomic_int done;                     /* chunks finished */
  _Atomic(void*) error;                /* the first error a worker raised (TVM-FFI errors are per thread) */
  atomic_int rc;
} job;

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static int64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int claim(int home, uint64_t gen, int per_home) {
  uint64_t w = atomic_load_explicit(&homes[home].word, memory_order_acquire);
  for (;;) {
    if ((w >> 32) != gen || (uint32_t)w >= (uint32_t)per_home) return -1;
    if (atomic_compare_exchange_weak_explicit(&homes[home].word, &w, w + 1, memory_order_acq_rel,
                                              memory_order_acquire))
      return (int)(uint32_t)w;
  }
}

/* Run chunks of generation `gen`, this thread's home block first. Fields read before a successful claim belong
   to `gen`: the next job is published only after every chunk of this one was claimed and finished. */
static void work(uint64_t gen, int home) {
  KilnLambda f = atomic_load_explicit(&job.f, memory_order_relaxed);
  void* cdata = atomic_load_explicit(&job.cdata, memory_order_relaxed);
  int per_home = atomic_load_explicit(&job.per_home, memory_order_relaxed);
  int n_homes = atomic_load_explicit(&job.n_homes, memory_order_relaxed);
  if (home >= n_homes) return;
  KilnParallelEnv env = {0, per_home * n_homes};
  for (int s = 0; s < n_homes; s++) {
    int h = (home + s) % n_homes, i;
    while ((i = claim(h, gen, per_home)) >= 0) {
      int rc = f(h * per_home + i, &env, cdata);
      if (rc != 0) {
        int zero = 0;
        if (atomic_compare_exchange_strong(&job.rc, &zero, rc) && in_worker) {
          TVMFFIObjectHandle err = 0;
          TVMFFIErrorMoveFromRaised(&err);
          atomic_store(&job.error, err);
        }
      }
      atomic_fetch_add_explicit(&job.done, 1, memory_order_release);
    }
  }
}

static cpu_set_t caller_cpus;  /* where the caller may run, when the workers started */

/* Worker i stays on the (i+1)-th core the caller may use, as TVM's do (KILN_POOL_PIN=0: not): a worker that moves
   finds its block's data in the other core's cache. Unpinned, against pinned, same process, 9 alternating blocks
   on the loaded VM: ResNet-50 1.085 vs 1.059x ORT, BERT layer 0.888 vs 0.806x, ShuffleNet 1.074 vs 1.040x,
   MobileNetV2 0.891 vs 0.878x. The caller stays free, so it never shares a core with a worker for long, and a
   worker whose core is busy costs nothing (its block is taken). */
static void pin(int index) {
  int seen_cpus = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
    if (!CPU_ISSET(cpu, &caller_cpus)) continue;
    if (seen_cpus++ == index + 1) {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpu, &one);
      sched_setaffinity(0, sizeof one, &one);
      return;
    }
  }
}

static void* worker_main(void* arg) {
  int index = (int)(intptr_t)arg;
  uint64_t seen = worker_seen[index];
  in_worker = 1;
  const char* pin_env = getenv("KILN_POOL_PIN");
  if (!pin_env || pin_env[0] != '0') pin(index);
  for (;;) {
    uint64_t g = atomic_load_explicit(&job.gen, memory_order_acquire);
    if (g == seen && !atomic_load_explicit(&quitting, memory_order_relaxed)) {
      int64_t until = now_us() + atomic_load_explicit(&spin_us, memory_order_relaxed);
      for (int i = 1;; i++) {
        relax();
        g = atomic_load_explicit(&job.gen, memory_order_acquire);
        if (g != seen || atomic_load_explicit(&quitting, memory_order_relaxed)) break;
        if ((i & 255) == 0 && now_us() > until) {
          pthread_mutex_lock(&pool_lock);
          atomic_fetch_add(&sleepers, 1);
          while ((g = atomic_load(&job.gen)) == seen && !atomic_load(&quitting))
            pthread_cond_wait(&pool_wake, &pool_lock);
          atomic_fetch_sub(&sleepers, 1);
          pthread_mutex_unlock(&pool_lock);
          break;
        }
      }
    }
    if (atomic_load(&quitting)) return 0;
    seen = g;
    work(g, index + 1);
  }
}

static void forget_workers(void) {  /* in a forked child: the parent's workers do not exist here */
  pthread_mutex_t fresh_lock = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t fresh_wake = PTHREAD_COND_INITIALIZER;
  pool_lock = fresh_lock;
  pool_wake = fresh_wake;
  n_started = 0;
  atomic_store(&sleepers, 0);
  atomic_flag_clear(&busy);
}

/* Start workers up to `want`; returns how many run. */
static int start_workers(int want) {
  static int atfork_done;
  pthread_mutex_lock(&pool_lock);
  if (!atfork_done) {
    pthread_atfork(0, 0, forget_workers);
    atfork_done = 1;
  }
  CPU_ZERO(&caller_cpus);
  sched_getaffinity(0, sizeof caller_cpus, &caller_cpus);
  sigset_t all, old;
  sigfillset(&all);
  sigprocmask(SIG_SETMASK, &all, &old);  /* signals are for the caller's threads, never a worker */
  while (n_started < want && n_started < KILN_MAX_WORKERS) {
    worker_seen[n_started] = atomic_load(&job.gen);
    if (pthread_create(&workers[n_started], 0, worker_main, (void*)(intptr_t)n_started) != 0) break;
    n_started++;
  }
  sigprocmask(SIG_SETMASK, &old, 0);
  int n = n_started;
  pthread_mutex_unlock(&pool_lock);
  return n;
}

static int run_inline(KilnLambda f, void* cdata) {
  KilnParallelEnv env = {0, 1};
  return f(0, &env, cdata);
}

static int kiln_launch(KilnLambda f, void* cdata, int num_task) {
  (void)num_task;
  int threads = atomic_load_explicit(&pool_threads, memory_order_relaxed);
  if (thread_cap > 0 && thread_cap < threads) threads = thread_cap;
  if (threads <= 1 || in_worker) return run_inline(f, cdata);
  if (atomic_flag_test_and_set_explicit(&busy, memory_order_acquire)) return run_inline(f, cdata);
  int n_workers = threads - 1;
  if (n_started < n_workers) {
    int got = start_workers(n_workers);
    if (got < n_workers) n_workers = got;
  }
  if (n_workers <= 0) {
    atomic_flag_clear_explicit(&busy, memory_order_release);
    return run_inline(f, cdata);
  }
  int per_home = 1;
  for (int k = atomic_load_explicit(&chunks_per_thread, memory_order_relaxed); k > 1; k--) {
    if (kiln_loop_gcd > 0 && kiln_loop_gcd % (k * (n_workers + 1)) == 0) {
      per_home = k;
      break;
    }
  }
  int n = (n_workers + 1) * per_home;
  uint64_t gen = atomic_load_explicit(&job.gen, memory_order_relaxed) + 1;
  for (int h = 0; h <= n_workers; h++) atomic_store_explicit(&homes[h].word, gen << 32, memory_order_relaxed);
  atomic_store_explicit(&job.f, f, memory_order_relaxed);
  atomic_store_explicit(&job.cdata, cdata, memory_order_relaxed);
  atomic_store_explicit(&job.per_home, per_home, memory_order_relaxed);
  atomic_store_explicit(&job.n_homes, n_workers + 1, memory_order_relaxed);
  atomic_store_explicit(&job.done, 0, memory_order_relaxed);
  atomic_store_explicit(&job.rc, 0, memory_order_relaxed);
  atomic_store_explicit(&job.error, 0, memory_order_relaxed);
  atomic_store(&job.gen, gen);  /* publish (seq_cst, against a worker going to sleep) */
  if (atomic_load(&sleepers) > 0) {
    pthread_mutex_lock(&pool_lock);
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
  }
  work(gen, 0);
  for (int i = 1; atomic_load_explicit(&job.done, memory_order_acquire) < n; i++) {
    relax();
    if ((i & 1023) == 0) sched_yield();  /* a worker holding a chunk is not running: let it */
  }
  int rc = atomic_load(&job.rc);
  void* err = atomic_load(&job.error);
  atomic_flag_clear_explicit(&busy, memory_order_release);
  if (err) {  /* raised on a worker: hand it to the caller's thread */
    TVMFFIErrorSetRaised(err);
    TVMFFIObjectDecRef(err);
  }
  return rc;
}

static void __attribute__((destructor)) stop_workers(void) {
  pthread_mutex_lock(&pool_lock);
  atomic_store(&quitting, 1);
  pthread_cond_broadcast(&pool_wake);
  int n = n_started;
  pthread_mutex_unlock(&pool_lock);
  for (int i = 0; i < n; i++) pthread_join(workers[i], 0);
  pthread_mutex_lock(&pool_lock);
  n_started = 0;
  pthread_mutex_unlock(&pool_lock);
}

/* kiln_pool(threads[, chunks_per_thread, spin_us, cap]): threads >= 1 installs this pool with that many
   threads; 0 puts TVM's back; -1 leaves both. cap > 0 limits launches from the calling thread, 0 lifts that,
   -1 leaves it. Returns the thread count before the call (0: TVM's pool was installed, -1: no kernel has a
   parallel loop, -2: a kernel uses a barrier, so TVM's pool stays). */
int __tvm_ffi_kiln_pool(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* ret) {
  if (n < 1 || n > 4) {
    TVMFFIErrorSetRaisedFromCStr("ValueError", "kiln_pool takes threads[, chunks_per_thread, spin_us, cap]");
    return -1;
  }
  for (int i = 0; i < n; i++) {
    if (args[i].type_index != kTVMFFIInt) {
      TVMFFIErrorSetRaisedFromCStr("TypeError", "kiln_pool takes integers");
      return -1;
    }
  }
  int64_t threads = args[0].v_int64;
  int previous = -1;
  if (&__TVMBackendParallelBarrier != 0) {
    previous = -2;  /* a kernel synchronizes its tasks: TVM's pool stays */
  } else if (&__TVMBackendParallelLaunch != 0) {
    pthread_mutex_lock(&pool_lock);
    int installed = __TVMBackendParallelLaunch == (void*)kiln_launch;
    previous = installed ? atomic_load(&pool_threads) : 0;
    if (threads >= 1) {
      if (!installed) {
        tvm_launch = (KilnLaunch)__TVMBackendParallelLaunch;
        __TVMBackendParallelLaunch = (void*)kiln_launch;
      }
      atomic_store(&pool_threads, threads > KILN_MAX_WORKERS + 1 ? KILN_MAX_WORKERS + 1 : (int)threads);
    } else if (threads == 0 && installed && tvm_launch) {
      __TVMBackendParallelLaunch = (void*)tvm_launch;
    }
    pthread_mutex_unlock(&pool_lock);
  }
  if (n > 1 && args[1].v_int64 >= 1) atomic_store(&chunks_per_thread, (int)args[1].v_int64);
  if (n > 2 && args[2].v_int64 >= 0) atomic_store(&spin_us, (int)args[2].v_int64);
  if (n > 3 && args[3].v_int64 >= 0) thread_cap = (int)args[3].v_int64;
  ret->type_index = kTVMFFIInt;
  ret->zero_padding = 0;
  ret->v_int64 = previous;
  return 0;
}
"""


def loop_gcd(prim_func) -> int:
    """The gcd of the constant extents of a kernel's parallel loops (0 if it has none, or one is not constant):
    the entry hands it to the pool before the kernel runs, so a launch splits only into equal chunks."""
    from tvm import tirx

    extents: list[int] = []
    stack = [prim_func.body]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if isinstance(node, tirx.For):
            if node.kind == tirx.ForKind.PARALLEL:
                if not isinstance(node.extent, tirx.IntImm):
                    return 0
                extents.append(int(node.extent))
            stack.append(node.body)
        elif hasattr(node, "seq"):
            stack.extend(node.seq)
        elif hasattr(node, "block"):  # a block's realize: its body and its init
            stack.extend([node.block.body, getattr(node.block, "init", None)])
        elif hasattr(node, "then_case"):
            stack.extend([node.then_case, node.else_case])
        elif hasattr(node, "body"):
            stack.append(node.body)
    return math.gcd(*extents) if extents else 0
