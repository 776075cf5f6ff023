/* Prints this host's TSC rate in kHz (median of 5 measurements of 50 ms against
 * CLOCK_MONOTONIC_RAW).
 *
 * Why: under QEMU TCG the guest's TSC runs at the host's TSC rate, and the guest kernel's own
 * calibration against the emulated PIT fails on a loaded host, after which the boot hangs.
 * The build puts this value in the guest's command line as tsc_early_khz=, which skips that
 * calibration. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <x86intrin.h>

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC_RAW, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(void)
{
    double khz[5];
    int i;

    for (i = 0; i < 5; i++) {
        struct timespec pause = {0, 50 * 1000 * 1000};
        double t0 = now_ns();
        unsigned long long c0 = __rdtsc();
        double t1;
        unsigned long long c1;
        nanosleep(&pause, NULL);
        t1 = now_ns();
        c1 = __rdtsc();
        khz[i] = (double)(c1 - c0) / (t1 - t0) * 1e6;
    }
    qsort(khz, 5, sizeof khz[0], cmp);
    if (khz[2] < 1e5 || khz[2] > 1e8) {
        fprintf(stderr, "tsc-khz: implausible TSC rate %.0f kHz\n", khz[2]);
        return 1;
    }
    printf("%.0f\n", khz[2]);
    return 0;
}
