/*
 * ftvm-diskwriter: writes a verifiable pattern to a block device, forever, so a test on the host
 * can check that the disk the agent captured at each checkpoint is exactly what the guest wrote.
 *
 *   ftvm-diskwriter [-r BLOCKS_PER_SECOND|max] [-n BLOCKS] DEVICE
 *
 * Round r = 1, 2, ... writes blocks 0 .. n-1 of DEVICE in order, one 4096-byte block per write,
 * with O_DIRECT (each write is a request to the virtual disk when it returns, not a page in the
 * guest's cache). Block k of round r holds 128 copies of the 32-byte record
 *
 *   "FTVMDSK1" | k (u64 LE) | r (u64 LE) | k * 0x9E3779B97F4A7C15 ^ r (u64 LE)
 *
 * -n 0 (the default) means the whole device. A block the writer never reached is still all zeroes.
 * A failed write is reported and the writer moves on to the next block a second later. Progress goes to stdout (the serial
 * console) once a second: "ftvm-diskwriter: round R block K writes W rate B/s".
 * With -r max the writes are unpaced: the rate line is then the device's guest-side throughput.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096u
#define RECORD 32u
#define BLKGETSIZE64_REQ _IOR(0x12, 114, size_t)

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void fill(unsigned char *buf, uint64_t k, uint64_t r)
{
    unsigned char rec[RECORD];
    memcpy(rec, "FTVMDSK1", 8);
    put_u64(rec + 8, k);
    put_u64(rec + 16, r);
    put_u64(rec + 24, (k * 0x9E3779B97F4A7C15ull) ^ r);
    for (unsigned off = 0; off < BLOCK; off += RECORD)
        memcpy(buf + off, rec, RECORD);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    unsigned long rate = 0; /* 0 = unpaced */
    unsigned long long nblocks = 0;
    int opt, fd;
    unsigned char *buf;
    unsigned long long size = 0, writes = 0, last_writes = 0;
    double start, last_report;

    while ((opt = getopt(argc, argv, "r:n:")) != -1) {
        switch (opt) {
        case 'r': {
            char *end;
            if (strcmp(optarg, "max") == 0) {
                rate = 0;
                break;
            }
            errno = 0;
            rate = strtoul(optarg, &end, 10);
            if (errno || *end || end == optarg || rate == 0) {
                fprintf(stderr, "ftvm-diskwriter: bad rate '%s' (blocks per second or max)\n",
                        optarg);
                return 2;
            }
            break;
        }
        case 'n': {
            char *end;
            errno = 0;
            nblocks = strtoull(optarg, &end, 10);
            if (errno || *end || end == optarg) {
                fprintf(stderr, "ftvm-diskwriter: bad block count '%s'\n", optarg);
                return 2;
            }
            break;
        }
        default:
            fprintf(stderr, "usage: %s [-r BLOCKS_PER_SECOND|max] [-n BLOCKS] DEVICE\n", argv[0]);
            return 2;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: %s [-r BLOCKS_PER_SECOND|max] [-n BLOCKS] DEVICE\n", argv[0]);
        return 2;
    }
    fd = open(argv[optind], O_WRONLY | O_DIRECT);
    if (fd < 0) {
        fprintf(stderr, "ftvm-diskwriter: open %s: %s\n", argv[optind], strerror(errno));
        return 1;
    }
    if (ioctl(fd, BLKGETSIZE64_REQ, &size) != 0) {
        fprintf(stderr, "ftvm-diskwriter: size of %s: %s\n", argv[optind], strerror(errno));
        return 1;
    }
    if (nblocks == 0 || nblocks > size / BLOCK)
        nblocks = size / BLOCK;
    if (nblocks == 0) {
        fprintf(stderr, "ftvm-diskwriter: %s is smaller than one block\n", argv[optind]);
        return 1;
    }
    /* O_DIRECT needs a buffer aligned to the device's logical block size; a page is enough. */
    if (posix_memalign((void **)&buf, BLOCK, BLOCK) != 0) {
        fprintf(stderr, "ftvm-diskwriter: out of memory\n");
        return 1;
    }
    printf("ftvm-diskwriter: writing %llu blocks of %s at %s\n", nblocks, argv[optind],
           rate ? "a paced rate" : "full speed");
    fflush(stdout);

    start = last_report = now_s();
    for (uint64_t r = 1;; r++) {
        for (uint64_t k = 0; k < nblocks; k++) {
            fill(buf, k, r);
            if (pwrite(fd, buf, BLOCK, (off_t)(k * BLOCK)) != (ssize_t)BLOCK) {
                fprintf(stderr, "ftvm-diskwriter: write of block %llu: %s\n",
                        (unsigned long long)k, strerror(errno));
                sleep(1);
                continue;
            }
            writes++;
            if (rate) {
                /* Sleep until this write is due: writes / rate seconds after the start. */
                double due = start + (double)writes / (double)rate, t = now_s();
                if (due > t)
                    usleep((useconds_t)((due - t) * 1e6));
            }
            double t = now_s();
            if (t - last_report >= 1.0) {
                printf("ftvm-diskwriter: round %llu block %llu writes %llu rate %.0f B/s\n",
                       (unsigned long long)r, (unsigned long long)k, writes,
                       (double)(writes - last_writes) * BLOCK / (t - last_report));
                fflush(stdout);
                last_writes = writes;
                last_report = t;
            }
        }
    }
}
