/* The dirtying knob: a background thread rewrites a chosen number of distinct 4 KiB pages per
 * second in a large anonymous buffer, so the checkpointing host sees a controlled dirty rate.
 *
 * Pacing uses CLOCK_MONOTONIC only and never tries to catch up more than one second of backlog
 * (a VM paused or restored from a checkpoint must not cause a burst of writes). */
#ifndef FTVM_GUEST_DIRTIER_H
#define FTVM_GUEST_DIRTIER_H

#include <stddef.h>

enum dirty_mode {
    DIRTY_SCATTER = 0, /* pages in a fixed pseudo-random order: many separate regions */
    DIRTY_SEQUENTIAL = 1 /* pages in address order: few long regions */
};

struct dirtier_stats {
    unsigned rate;                 /* pages per second in effect */
    enum dirty_mode mode;
    size_t buffer_pages;           /* pages in the buffer: the highest possible rate */
    unsigned long long written;    /* page writes done since boot */
};

/* Maps a buffer of buffer_bytes and starts the thread. Returns 0, or a negative errno. */
int dirtier_start(size_t buffer_bytes, unsigned rate, enum dirty_mode mode);

/* Sets the rate (capped at the buffer's page count so pages within a second stay distinct).
 * Returns the rate in effect. */
unsigned dirtier_set_rate(unsigned pages_per_second);

void dirtier_set_mode(enum dirty_mode mode);

void dirtier_get_stats(struct dirtier_stats *out);

const char *dirty_mode_name(enum dirty_mode mode);

/* Parses "scatter" / "seq" / "sequential". Returns 0 on success, -1 if unknown. */
int dirty_mode_parse(const char *s, enum dirty_mode *out);

#endif
