/* Small C helpers for mcs/_gsm.pyx: layouts, atomics, futex, cached ids, heartbeat thread.
 * Everything here is mechanism; policy lives in Python. */
#ifndef MCS_GSM_NATIVE_H
#define MCS_GSM_NATIVE_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Every mapping starts with this header; the user area follows it. */
typedef struct {
    uint64_t magic;      /* written last when an object is initialised */
    uint64_t nonce;      /* random: makes a reused identifier fail */
    uint64_t size;       /* size of the user area */
    uint64_t failed;     /* poisoned flag (memory-failure model) */
    uint64_t created_ns; /* CLOCK_REALTIME at creation */
    uint32_t version;    /* layout version of the object's kind */
    uint32_t uid;        /* creator's effective uid */
    uint64_t state;      /* kind-specific state word (bootstrap: live/removed) */
    uint64_t reserved;
} mcs_header;

#define MCS_HEADER_SIZE 64
_Static_assert(sizeof(mcs_header) == MCS_HEADER_SIZE, "mcs_header must be 64 bytes");

/* A mutex slot: the pthread mutex, then metadata (magic, owner pid, when taken, owner tag).
 * The owner's thread id is the kernel's: the robust futex word (the first word of the pthread
 * mutex) holds it, which the kernel's robust-list ABI guarantees. */
typedef struct { pthread_mutex_t mutex; } mcs_mutex_slot;
typedef struct {
    uint32_t magic;
    uint32_t pid;
    uint32_t taken; /* MCS_TAKEN_HELD | MCS_TAKEN_COUNTED | coarse monotonic ms (mod 2^32); 0: free */
    uint32_t state; /* MCS_MUTEX_CONSISTENT / _INCONSISTENT / _NOTRECOVERABLE */
    uint64_t tag;
} mcs_mutex_meta;
#define MCS_TAKEN_HELD 1u
#define MCS_TAKEN_COUNTED 2u
#define MCS_TAKEN_FLAGS 3u
#define MCS_FUTEX_TID_MASK 0x3fffffffu

/* Our own record of the robust state. glibc's trylock on a not-recoverable mutex returns
 * ENOTRECOVERABLE but leaves the lock word owned by the caller (others then see EBUSY forever),
 * so lock() consults this word first and never calls into glibc for such a mutex. */
#define MCS_MUTEX_CONSISTENT 0u
#define MCS_MUTEX_INCONSISTENT 1u
#define MCS_MUTEX_NOTRECOVERABLE 2u

#define MCS_MUTEX_META_OFFSET ((sizeof(pthread_mutex_t) + 7) & ~(size_t)7)
#define MCS_MUTEX_SLOT_SIZE (((MCS_MUTEX_META_OFFSET + sizeof(mcs_mutex_meta)) + 15) & ~(size_t)15)
#define MCS_MUTEX_MAGIC 0x584d434du /* "MCMX" */

static inline mcs_mutex_meta *mcs_mutex_meta_of(void *slot) {
    return (mcs_mutex_meta *)((char *)slot + MCS_MUTEX_META_OFFSET);
}

/* An event slot: futex sequence word, waiter count, magic. */
typedef struct {
    uint32_t seq;
    uint32_t waiters;
    uint32_t magic;
    uint32_t spare;
} mcs_event_slot;
#define MCS_EVENT_SLOT_SIZE 16
#define MCS_EVENT_MAGIC 0x56454d4du /* "MMEV" */

/* Cached pid and per-thread tid, reset in a forked child. */
static int mcs_cached_pid;
static __thread int mcs_cached_tid;
static __thread int mcs_cached_tid_pid;

static void mcs_after_fork_child(void) { mcs_cached_pid = (int)getpid(); }

static inline int mcs_pid(void) { return mcs_cached_pid; }

static inline int mcs_tid(void) {
    if (mcs_cached_tid_pid != mcs_cached_pid) {
        mcs_cached_tid = (int)syscall(SYS_gettid);
        mcs_cached_tid_pid = mcs_cached_pid;
    }
    return mcs_cached_tid;
}

static void mcs_init_process(void) {
    mcs_cached_pid = (int)getpid();
    pthread_atfork(NULL, NULL, mcs_after_fork_child);
}

/* Locks this process holds now (every counted mutex, whatever its section) and since when
 * (coarse CLOCK_MONOTONIC ns of the 0 -> 1 step), for the operator: process memory, summed into
 * the member slot by the heartbeat thread, so no thread ever writes into a mapping that may be
 * unmapped under it. Each thread counts in its own cell (a plain store, no atomic: the lock path
 * stays cheap), cache-line sized; threads beyond MCS_HELD_CELLS share an atomic overflow cell.
 * Every native module includes this header: mcs._gsm owns the table and the others point at it
 * (mcs_share_held_counters), so one count covers every locker of the process. */
#define MCS_HELD_CELLS 256
typedef struct { uint64_t count; uint64_t since_ns; char pad[48]; } mcs_held_cell;
typedef struct {
    uint64_t next;
    char pad[56];
    mcs_held_cell cells[MCS_HELD_CELLS];
    mcs_held_cell overflow;
} mcs_held_table;
static mcs_held_table mcs_held_own;
static mcs_held_table *mcs_held_counters = &mcs_held_own;
static __thread mcs_held_cell *mcs_held_mine;
static inline void mcs_share_held_counters(void *owner) {
    if (owner) mcs_held_counters = (mcs_held_table *)owner;
}

static inline mcs_held_cell *mcs_held_cell_of_thread(void) {
    mcs_held_cell *c = mcs_held_mine;
    if (!c) {
        uint64_t i = __atomic_fetch_add(&mcs_held_counters->next, 1, __ATOMIC_RELAXED);
        c = i < MCS_HELD_CELLS ? &mcs_held_counters->cells[i] : &mcs_held_counters->overflow;
        mcs_held_mine = c;
    }
    return c;
}

static inline void mcs_held_add(int64_t now_ns) {
    mcs_held_cell *c = mcs_held_cell_of_thread();
    if (c == &mcs_held_counters->overflow) {
        if (__atomic_fetch_add(&c->count, 1, __ATOMIC_RELAXED) == 0)
            __atomic_store_n(&c->since_ns, (uint64_t)now_ns, __ATOMIC_RELAXED);
        return;
    }
    uint64_t n = c->count;
    if (n == 0)
        __atomic_store_n(&c->since_ns, (uint64_t)now_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&c->count, n + 1, __ATOMIC_RELEASE);
}

static inline void mcs_held_sub(void) {
    mcs_held_cell *c = mcs_held_cell_of_thread();
    if (c == &mcs_held_counters->overflow)
        __atomic_fetch_sub(&c->count, 1, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&c->count, c->count - 1, __ATOMIC_RELEASE);
}

/* The process's locks held now and the oldest 0 -> 1 step among the threads holding any. */
static inline uint64_t mcs_held_total(uint64_t *since_ns) {
    mcs_held_table *t = mcs_held_counters;
    uint64_t used = __atomic_load_n(&t->next, __ATOMIC_RELAXED), total = 0, since = 0;
    if (used > MCS_HELD_CELLS) used = MCS_HELD_CELLS;
    for (uint64_t i = 0; i <= used; i++) {
        mcs_held_cell *c = i < used ? &t->cells[i] : &t->overflow;
        uint64_t n = __atomic_load_n(&c->count, __ATOMIC_ACQUIRE);
        if (n == 0 || n > (1u << 30)) /* 0, or a transient torn value: skip */
            continue;
        uint64_t s = __atomic_load_n(&c->since_ns, __ATOMIC_RELAXED);
        total += n;
        if (s && (since == 0 || s < since)) since = s;
    }
    *since_ns = since;
    return total;
}

static inline int64_t mcs_now_ns(int clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void mcs_deadline(int64_t ns, struct timespec *ts) {
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
}

/* Shared (not PRIVATE) futex: the word lives in memory mapped by several processes. */
static inline long mcs_futex_wait(uint32_t *addr, uint32_t val, int64_t rel_ns) {
    struct timespec ts;
    mcs_deadline(rel_ns, &ts);
    return syscall(SYS_futex, addr, FUTEX_WAIT, val, &ts, NULL, 0);
}

static inline long mcs_futex_wake(uint32_t *addr, int n) {
    return syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* Whether [off, off + len) lies inside a buffer of `total` bytes and `off` is a multiple of
 * `align` (a power of two, or 1): the bounds check every native reader of a section applies to
 * an offset before forming a pointer (offsets may come from shared memory, so never trusted). */
static inline int mcs_span_ok(int64_t off, int64_t len, int64_t total, int64_t align) {
    return off >= 0 && len >= 0 && off <= total && len <= total - off && (off & (align - 1)) == 0;
}

static inline uint64_t mcs_load64(void *p) { return __atomic_load_n((uint64_t *)p, __ATOMIC_SEQ_CST); }
static inline void mcs_store64(void *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_SEQ_CST); }
static inline int mcs_cas64(void *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n((uint64_t *)p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline uint64_t mcs_add64(void *p, uint64_t delta) { return __atomic_fetch_add((uint64_t *)p, delta, __ATOMIC_SEQ_CST); }
static inline uint32_t mcs_load32(void *p) { return __atomic_load_n((uint32_t *)p, __ATOMIC_SEQ_CST); }
static inline void mcs_store32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t mcs_add32(void *p, uint32_t delta) { return __atomic_fetch_add((uint32_t *)p, delta, __ATOMIC_SEQ_CST); }

/* The robust-mutex core, shared by GlobalMutex (mcs/_gsm.pyx) and the native lockers of
 * mcs/_undo.pyx and mcs/_dict.pyx: one implementation of the state word, the owner metadata and
 * the abandoned / not-recoverable rules. None of these take the GIL or check signals. */
static int mcs_mutex_init(void *slot) {
    mcs_mutex_meta *meta = mcs_mutex_meta_of(slot);
    pthread_mutexattr_t attr;
    int rc;
    mcs_store32(&meta->magic, 0);
    memset(slot, 0, MCS_MUTEX_SLOT_SIZE);
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
    rc = pthread_mutex_init((pthread_mutex_t *)slot, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc == 0)
        mcs_store32(&meta->magic, MCS_MUTEX_MAGIC);
    return rc;
}

/* trylock, but never into glibc for a mutex recorded not recoverable (see above). */
static inline int mcs_mutex_trylock(void *slot) {
    if (mcs_load32(&mcs_mutex_meta_of(slot)->state) == MCS_MUTEX_NOTRECOVERABLE)
        return ENOTRECOVERABLE;
    return pthread_mutex_trylock((pthread_mutex_t *)slot);
}

/* One blocking attempt until the absolute CLOCK_MONOTONIC time until_ns. */
static inline int mcs_mutex_lock_until(void *slot, int64_t until_ns) {
    struct timespec ts;
    mcs_deadline(until_ns, &ts);
    return pthread_mutex_clocklock((pthread_mutex_t *)slot, CLOCK_MONOTONIC, &ts);
}

/* Coarse monotonic time (a vDSO read of the tick clock, ~10 ns where CLOCK_MONOTONIC costs
 * 45): hold times are judged in seconds, so the tick's 1-4 ms resolution is plenty. */
static inline int64_t mcs_coarse_ns(void) { return mcs_now_ns(CLOCK_MONOTONIC_COARSE); }

/* Milliseconds of a coarse time, modulo 2^32 (wraps every 49 days; differences of two stamps
 * are taken modulo 2^32). */
static inline uint32_t mcs_ms32(int64_t ns) { return (uint32_t)((uint64_t)ns / 1000000u); }
static inline uint32_t mcs_coarse_ms(void) { return mcs_ms32(mcs_coarse_ns()); }

/* Whether this thread's hold watch is due again (at most once per period per thread, whatever
 * the timeouts of the lock calls it makes: a waiter retrying in 5 ms slices is still judged). */
static __thread int64_t mcs_watch_last_ns;
static inline int mcs_watch_due(int64_t period_ns) {
    int64_t now = mcs_now_ns(CLOCK_MONOTONIC_COARSE);
    if (now - mcs_watch_last_ns < period_ns)
        return 0;
    mcs_watch_last_ns = now;
    return 1;
}

/* Milliseconds the current holder has held the mutex (0 if free or unknown). */
static inline uint32_t mcs_mutex_held_ms(void *slot) {
    uint32_t taken = mcs_load32(&mcs_mutex_meta_of(slot)->taken);
    if (!(taken & MCS_TAKEN_HELD))
        return 0;
    return (mcs_coarse_ms() - (taken & ~MCS_TAKEN_FLAGS)) & ~MCS_TAKEN_FLAGS;
}

/* Stamp the take once per holding (a repaired abandoned lock keeps its first stamp) and count
 * it in this process's locks held. */
static inline void mcs_mutex_taken(mcs_mutex_meta *meta, int counted) {
    if (meta->taken & MCS_TAKEN_HELD)
        return;
    int64_t now = mcs_coarse_ns();
    if (counted)
        mcs_held_add(now);
    mcs_store32(&meta->taken, (mcs_ms32(now) & ~MCS_TAKEN_FLAGS) | MCS_TAKEN_HELD
                              | (counted ? MCS_TAKEN_COUNTED : 0u));
}

/* Record the calling thread as the holder (after 0 or EOWNERDEAD). */
static inline void mcs_mutex_owned_as(void *slot, uint64_t tag, int counted) {
    mcs_mutex_meta *meta = mcs_mutex_meta_of(slot);
    meta->pid = (uint32_t)mcs_pid();
    mcs_mutex_taken(meta, counted);
    meta->tag = tag;
}

static inline void mcs_mutex_owned(void *slot, uint64_t tag) { mcs_mutex_owned_as(slot, tag, 1); }

/* Just got it from a dead holder (EOWNERDEAD): its stamp and count are not ours. */
static inline void mcs_mutex_inherited(void *slot) {
    mcs_store32(&mcs_mutex_meta_of(slot)->taken, 0);
}

/* After EOWNERDEAD: the data is inconsistent until mcs_mutex_mark_consistent. */
static inline void mcs_mutex_abandoned(void *slot) {
    mcs_store32(&mcs_mutex_meta_of(slot)->state, MCS_MUTEX_INCONSISTENT);
}

static inline void mcs_mutex_not_recoverable(void *slot) {
    mcs_store32(&mcs_mutex_meta_of(slot)->state, MCS_MUTEX_NOTRECOVERABLE);
}

/* Whether the calling thread holds the mutex: our pid recorded, our tid in the futex word. */
static inline int mcs_mutex_held_by_me(void *slot) {
    mcs_mutex_meta *meta = mcs_mutex_meta_of(slot);
    return meta->pid == (uint32_t)mcs_pid()
        && (mcs_load32(slot) & MCS_FUTEX_TID_MASK) == (uint32_t)mcs_tid();
}

static inline int mcs_mutex_release(void *slot) {
    mcs_mutex_meta *meta = mcs_mutex_meta_of(slot);
    if (meta->taken & MCS_TAKEN_COUNTED)
        mcs_held_sub();
    meta->pid = 0;
    mcs_store32(&meta->taken, 0);
    meta->tag = 0;
    if (meta->state == MCS_MUTEX_INCONSISTENT)
        /* Released unrepaired: glibc makes it not recoverable; record that before unlocking. */
        mcs_store32(&meta->state, MCS_MUTEX_NOTRECOVERABLE);
    return pthread_mutex_unlock((pthread_mutex_t *)slot);
}

static inline int mcs_mutex_mark_consistent(void *slot) {
    int rc = pthread_mutex_consistent((pthread_mutex_t *)slot);
    if (rc == 0)
        mcs_store32(&mcs_mutex_meta_of(slot)->state, MCS_MUTEX_CONSISTENT);
    return rc;
}

/* A whole lock for native callers: deadline_ns is an absolute CLOCK_MONOTONIC time, 0 = try
 * once, -1 = forever. Returns 0 (held, `tag` recorded), EOWNERDEAD (held, state INCONSISTENT:
 * the dead holder's tag is left in meta->tag for the caller to read and repair, its own tag is
 * recorded only by mcs_mutex_owned once repaired; so if the repairer dies too, the next locker
 * still finds the first owner's tag), ETIMEDOUT, ENOTRECOVERABLE, EDEADLK or another errno. */
static int mcs_mutex_lock(void *slot, uint64_t tag, int64_t deadline_ns) {
    int rc = mcs_mutex_trylock(slot);
    if (rc == EBUSY) {
        if (deadline_ns == 0)
            return ETIMEDOUT;
        if (deadline_ns < 0)
            rc = pthread_mutex_lock((pthread_mutex_t *)slot);
        else
            rc = mcs_mutex_lock_until(slot, deadline_ns);
    }
    if (rc == 0) {
        mcs_mutex_owned(slot, tag);
    } else if (rc == EOWNERDEAD) {
        mcs_mutex_meta *meta = mcs_mutex_meta_of(slot);
        meta->pid = (uint32_t)mcs_pid();
        mcs_mutex_inherited(slot);
        mcs_mutex_taken(meta, 1);
        mcs_mutex_abandoned(slot);
    } else if (rc == ENOTRECOVERABLE) {
        mcs_mutex_not_recoverable(slot);
    }
    return rc;
}

/* Heartbeat: a native thread that stores a monotonic stamp and bumps a counter every interval.
 * It never takes the GIL, so a busy interpreter does not look like a frozen process; only a
 * stopped process (SIGSTOP, frozen machine) stops it. */
typedef struct {
    pthread_t thread;
    void *stamp;
    void *counter;
    void *held;       /* optional: where to copy mcs_held_total() and its since */
    void *held_since;
    int64_t interval_ns;
    int stop;
    pthread_mutex_t lock;
    pthread_cond_t cond;
} mcs_beat;

static void *mcs_beat_main(void *arg) {
    mcs_beat *b = (mcs_beat *)arg;
    pthread_mutex_lock(&b->lock);
    while (!b->stop) {
        if (b->held) {
            uint64_t since, n = mcs_held_total(&since);
            mcs_store64(b->held_since, since);
            mcs_store64(b->held, n);
        }
        mcs_store64(b->stamp, (uint64_t)mcs_now_ns(CLOCK_MONOTONIC));
        mcs_add64(b->counter, 1);
        struct timespec ts;
        mcs_deadline(mcs_now_ns(CLOCK_MONOTONIC) + b->interval_ns, &ts);
        while (!b->stop) {
            if (pthread_cond_timedwait(&b->cond, &b->lock, &ts) == ETIMEDOUT) break;
        }
    }
    pthread_mutex_unlock(&b->lock);
    return NULL;
}

static mcs_beat *mcs_beat_start(void *stamp, void *counter, void *held, void *held_since,
                                int64_t interval_ns, int *err) {
    mcs_beat *b = (mcs_beat *)calloc(1, sizeof(mcs_beat));
    if (!b) { *err = ENOMEM; return NULL; }
    b->stamp = stamp;
    b->counter = counter;
    b->held = held;
    b->held_since = held_since;
    b->interval_ns = interval_ns;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b->cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&b->lock, NULL);
    int rc = pthread_create(&b->thread, NULL, mcs_beat_main, b);
    if (rc != 0) {
        pthread_cond_destroy(&b->cond);
        pthread_mutex_destroy(&b->lock);
        free(b);
        *err = rc;
        return NULL;
    }
    *err = 0;
    return b;
}

static void mcs_beat_stop(mcs_beat *b) {
    pthread_mutex_lock(&b->lock);
    b->stop = 1;
    pthread_cond_signal(&b->cond);
    pthread_mutex_unlock(&b->lock);
    pthread_join(b->thread, NULL);
    pthread_cond_destroy(&b->cond);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

/* A 64-bit checksum of a buffer, to detect corrupted cache entries (not adversaries).
 *
 * Eight 64-bit lane accumulators take one 64-byte stripe (eight words w[0..7]) per step:
 *     x = w[k] ^ KEY[k];   acc[k] += lo32(x) * hi32(x) + w[k ^ 1]
 * (every word enters one lane through a 32x32->64 multiply and its neighbour lane by addition),
 * and every 16 stripes each lane is scrambled: acc ^= acc >> 47; acc ^= SKEY[k]; acc *= P32.
 * Then the lanes, the tail words and bytes are folded and the result avalanched.
 *
 * The same function has a portable scalar form and an AVX2 form (4 lanes per register, 64-byte
 * stripe = 2 registers), chosen at run time; both give the same value. mcs_copy_checksum64 also
 * copies src to dst in the same pass and sums the words it stores, so the value describes the
 * copy exactly even if src changes meanwhile (shared memory poisoned by another process). */
#define MCS_K1 0x9E3779B185EBCA87ULL
#define MCS_K2 0xC2B2AE3D27D4EB4FULL
#define MCS_K3 0x165667B19E3779F9ULL
#define MCS_P32 0x9E3779B1ULL
#define MCS_SCRAMBLE_EVERY 16 /* stripes */

static const uint64_t MCS_KEY[8] = {
    0xBE4BA423396CFEB8ULL, 0x1CAD21F72C81017CULL, 0xDB979083E96DD4DEULL, 0x1F67B3B7A4A44072ULL,
    0x78E5C0CC4EE679CBULL, 0x2172FFCC7DD05A82ULL, 0x8E2443F7744608B8ULL, 0x4C263A81E69035E0ULL};
static const uint64_t MCS_SKEY[8] = {
    0xCB00C391BB52283CULL, 0xA32E531B8B65D088ULL, 0x4EF90DA297486471ULL, 0xD8ACDEA946EF1938ULL,
    0x3F349CE33F76FAA8ULL, 0x1D4F0BC7C7BBDCF9ULL, 0x3159B4CD4BE0518AULL, 0x647378D9C97E9FC8ULL};

static inline uint64_t mcs_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t mcs_fold(uint64_t lane[8], const unsigned char *tail, size_t n, size_t i) {
    uint64_t h = (uint64_t)n * MCS_K3;
    for (int k = 0; k < 8; k++)
        h = mcs_rotl64(h ^ (lane[k] * MCS_K2), 27) * MCS_K1 + MCS_K3;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, tail + i, 8);
        h = mcs_rotl64(h ^ (mcs_rotl64((MCS_K3 + w) * MCS_K1, 31)), 27) * MCS_K1 + MCS_K3;
    }
    for (; i < n; i++)
        h = mcs_rotl64(h ^ (tail[i] * MCS_K3), 11) * MCS_K1;
    h ^= h >> 33;
    h *= MCS_K2;
    h ^= h >> 29;
    h *= MCS_K3;
    h ^= h >> 32;
    return h;
}

/* The stripes of [src, src+n) with the lanes in lane[]; copies them to dst unless NULL.
 * Returns the number of bytes consumed (a multiple of 64). */
static inline size_t mcs_stripes_scalar(uint64_t lane[8], unsigned char *dst,
                                        const unsigned char *src, size_t n) {
    size_t i = 0, stripe = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t w[8];
        memcpy(w, src + i, 64);
        if (dst)
            memcpy(dst + i, w, 64);
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            uint64_t x = w[k] ^ MCS_KEY[k];
            lane[k] += (x & 0xFFFFFFFFULL) * (x >> 32) + w[k ^ 1];
        }
        if (++stripe % MCS_SCRAMBLE_EVERY == 0) {
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++)
                lane[k] = ((lane[k] ^ (lane[k] >> 47)) ^ MCS_SKEY[k]) * MCS_P32;
        }
    }
    return i;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MCS_HAVE_AVX2_PATH 1

__attribute__((target("avx2"))) static size_t mcs_stripes_avx2(
        uint64_t lane[8], unsigned char *dst, const unsigned char *src, size_t n) {
    __m256i a0 = _mm256_loadu_si256((const __m256i *)lane);
    __m256i a1 = _mm256_loadu_si256((const __m256i *)(lane + 4));
    const __m256i k0 = _mm256_loadu_si256((const __m256i *)MCS_KEY);
    const __m256i k1 = _mm256_loadu_si256((const __m256i *)(MCS_KEY + 4));
    const __m256i s0 = _mm256_loadu_si256((const __m256i *)MCS_SKEY);
    const __m256i s1 = _mm256_loadu_si256((const __m256i *)(MCS_SKEY + 4));
    const __m256i p32 = _mm256_set1_epi64x((long long)MCS_P32);
    size_t i = 0, stripe = 0;
    for (; i + 64 <= n; i += 64) {
        __m256i d0 = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i d1 = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        if (dst) {
            _mm256_storeu_si256((__m256i *)(dst + i), d0);
            _mm256_storeu_si256((__m256i *)(dst + i + 32), d1);
        }
        __m256i x0 = _mm256_xor_si256(d0, k0), x1 = _mm256_xor_si256(d1, k1);
        __m256i m0 = _mm256_mul_epu32(x0, _mm256_srli_epi64(x0, 32));
        __m256i m1 = _mm256_mul_epu32(x1, _mm256_srli_epi64(x1, 32));
        /* w[k ^ 1]: swap the two 64-bit words of each 128-bit half */
        a0 = _mm256_add_epi64(a0, _mm256_add_epi64(m0, _mm256_shuffle_epi32(d0, 0x4E)));
        a1 = _mm256_add_epi64(a1, _mm256_add_epi64(m1, _mm256_shuffle_epi32(d1, 0x4E)));
        if (++stripe % MCS_SCRAMBLE_EVERY == 0) {
            a0 = _mm256_xor_si256(_mm256_xor_si256(a0, _mm256_srli_epi64(a0, 47)), s0);
            a1 = _mm256_xor_si256(_mm256_xor_si256(a1, _mm256_srli_epi64(a1, 47)), s1);
            /* a * P32 mod 2^64 = lo32(a) * P32 + (hi32(a) * P32 << 32) */
            a0 = _mm256_add_epi64(_mm256_mul_epu32(a0, p32),
                                  _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a0, 32), p32), 32));
            a1 = _mm256_add_epi64(_mm256_mul_epu32(a1, p32),
                                  _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a1, 32), p32), 32));
        }
    }
    _mm256_storeu_si256((__m256i *)lane, a0);
    _mm256_storeu_si256((__m256i *)(lane + 4), a1);
    return i;
}
#endif

static int mcs_checksum_path = -1; /* 0 scalar, 1 AVX2; set once (a benign race) */

static inline int mcs_use_avx2(void) {
#ifdef MCS_HAVE_AVX2_PATH
    if (mcs_checksum_path < 0) {
        __builtin_cpu_init();
        mcs_checksum_path = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return mcs_checksum_path;
#else
    return 0;
#endif
}

static uint64_t mcs_checksum_impl(unsigned char *dst, const unsigned char *src, size_t n,
                                  int path) {
    uint64_t lane[8];
    size_t i;
    for (int k = 0; k < 8; k++)
        lane[k] = MCS_K2 * (uint64_t)(k + 1);
#ifdef MCS_HAVE_AVX2_PATH
    if (path == 1)
        i = mcs_stripes_avx2(lane, dst, src, n);
    else
#endif
        i = mcs_stripes_scalar(lane, dst, src, n);
    if (dst) {
        /* the tail is summed from the copy, like the stripes */
        memcpy(dst + i, src + i, n - i);
        return mcs_fold(lane, dst, n, i);
    }
    return mcs_fold(lane, src, n, i);
}

static uint64_t mcs_checksum64(const unsigned char *p, size_t n) {
    return mcs_checksum_impl(NULL, p, n, mcs_use_avx2());
}

static uint64_t mcs_copy_checksum64(unsigned char *dst, const unsigned char *src, size_t n) {
    return mcs_checksum_impl(dst, src, n, mcs_use_avx2());
}

#endif
