/* The dirtying knob (see dirtier.h). */
#include "dirtier.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* Pacing tick: small against a 25 ms checkpoint epoch, so each epoch sees a steady share. */
#define TICKS_PER_SECOND 500u
#define TICK_NS (1000000000L / TICKS_PER_SECOND)
/* Longest backlog made up after the thread was held up (VM paused, restored, starved). */
#define MAX_BACKLOG_NS 1000000000L

static unsigned char *buffer;
static size_t page_size;
static size_t npages;
static size_t scatter_stride;

static atomic_uint rate;
static atomic_int mode;
static atomic_ullong written;

/* The thread sleeps on this while the rate is 0, so an idle guest stays idle. */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static size_t gcd(size_t a, size_t b)
{
    while (b) {
        size_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* A step coprime with npages: stepping by it visits every page once per npages steps. */
static size_t pick_stride(size_t n)
{
    size_t s;
    if (n < 3)
        return 1;
    s = (size_t)((double)n * 0.6180339887) | 1;
    while (gcd(s, n) != 1)
        s += 2;
    return s % n ? s % n : 1;
}

static void add_ns(struct timespec *t, long ns)
{
    t->tv_nsec += ns;
    while (t->tv_nsec >= 1000000000L) {
        t->tv_nsec -= 1000000000L;
        t->tv_sec++;
    }
}

static long long diff_ns(const struct timespec *a, const struct timespec *b)
{
    return (long long)(a->tv_sec - b->tv_sec) * 1000000000LL + (a->tv_nsec - b->tv_nsec);
}

static void *dirtier_main(void *arg)
{
    struct timespec next, now;
    size_t index = 0;
    unsigned long long seq = 0, acc = 0;

    (void)arg;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        unsigned r = atomic_load_explicit(&rate, memory_order_relaxed);
        size_t n, i, stride;

        if (r == 0) {
            pthread_mutex_lock(&wake_lock);
            while (atomic_load(&rate) == 0)
                pthread_cond_wait(&wake, &wake_lock);
            pthread_mutex_unlock(&wake_lock);
            clock_gettime(CLOCK_MONOTONIC, &next);
            acc = 0;
            continue;
        }

        /* Pages owed this tick; the remainder carries over so low rates work too. */
        acc += r;
        n = (size_t)(acc / TICKS_PER_SECOND);
        acc %= TICKS_PER_SECOND;
        stride = atomic_load_explicit(&mode, memory_order_relaxed) == DIRTY_SEQUENTIAL
                     ? 1
                     : scatter_stride;
        for (i = 0; i < n; i++) {
            /* One 8-byte store dirties the page; a new value each time so its content changes
             * too (hash-diff trackers see it). */
            volatile uint64_t *word = (volatile uint64_t *)(buffer + index * page_size);
            *word = ++seq;
            index += stride;
            if (index >= npages)
                index -= npages;
        }
        if (n)
            atomic_fetch_add_explicit(&written, n, memory_order_relaxed);

        add_ns(&next, TICK_NS);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (diff_ns(&now, &next) > MAX_BACKLOG_NS)
            next = now; /* held up too long: drop the backlog instead of a burst */
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    return NULL;
}

int dirtier_start(size_t buffer_bytes, unsigned r, enum dirty_mode m)
{
    pthread_t tid;
    pthread_attr_t attr;
    int e;
    long ps = sysconf(_SC_PAGESIZE);

    page_size = ps > 0 ? (size_t)ps : 4096;
    npages = buffer_bytes / page_size;
    if (npages == 0)
        return -EINVAL;
    /* Anonymous private memory: pages get allocated on first write, so an idle knob costs no
     * guest RAM. MAP_NORESERVE: the size was already checked against the guest's RAM. */
    buffer = mmap(NULL, npages * page_size, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (buffer == MAP_FAILED)
        return -errno;
    scatter_stride = pick_stride(npages);
    atomic_store(&mode, m);
    dirtier_set_rate(r);

    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    e = pthread_create(&tid, &attr, dirtier_main, NULL);
    pthread_attr_destroy(&attr);
    return e ? -e : 0;
}

unsigned dirtier_set_rate(unsigned pages_per_second)
{
    unsigned r = pages_per_second;
    if (r > npages)
        r = (unsigned)npages;
    pthread_mutex_lock(&wake_lock);
    atomic_store(&rate, r);
    pthread_cond_signal(&wake);
    pthread_mutex_unlock(&wake_lock);
    return r;
}

void dirtier_set_mode(enum dirty_mode m) { atomic_store(&mode, m); }

void dirtier_get_stats(struct dirtier_stats *out)
{
    out->rate = atomic_load(&rate);
    out->mode = (enum dirty_mode)atomic_load(&mode);
    out->buffer_pages = npages;
    out->written = atomic_load(&written);
}

const char *dirty_mode_name(enum dirty_mode m) { return m == DIRTY_SEQUENTIAL ? "seq" : "scatter"; }

int dirty_mode_parse(const char *s, enum dirty_mode *out)
{
    if (strcmp(s, "scatter") == 0)
        *out = DIRTY_SCATTER;
    else if (strcmp(s, "seq") == 0 || strcmp(s, "sequential") == 0)
        *out = DIRTY_SEQUENTIAL;
    else
        return -1;
    return 0;
}
