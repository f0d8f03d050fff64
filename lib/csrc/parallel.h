/* A parallel for over independent units (points, clouds) on POSIX threads, shared by the
 * kernels in this folder. Threads are started per call (tens of microseconds, against calls of
 * a millisecond or more) rather than kept in a pool, so nothing outlives a call. */
#ifndef POINT_HAQ_PARALLEL_H
#define POINT_HAQ_PARALLEL_H

#include <pthread.h>
#include <stdint.h>

typedef void (*body_fn)(const void *args, int64_t unit);

typedef struct {
    body_fn body;
    const void *args;
    int64_t begin, end;
} span_t;

static void *run_span(void *p) {
    const span_t *s = (const span_t *)p;
    for (int64_t u = s->begin; u < s->end; ++u) s->body(s->args, u);
    return NULL;
}

/* body(args, u) for u in [0, units), in contiguous spans over up to `threads` threads (the
 * caller's included). */
static void for_each(body_fn body, const void *args, int64_t units, int threads) {
    enum { MAX_THREADS = 256 };
    if (threads > units) threads = (int)units;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1) {
        for (int64_t u = 0; u < units; ++u) body(args, u);
        return;
    }
    span_t spans[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < threads; ++t) {
        spans[t] = (span_t){body, args, units * t / threads, units * (t + 1) / threads};
        started[t] = t > 0 && pthread_create(&ids[t], NULL, run_span, &spans[t]) == 0;
    }
    run_span(&spans[0]);
    for (int t = 1; t < threads; ++t) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_span(&spans[t]); /* no thread to be had: do its share here */
    }
}

#endif
