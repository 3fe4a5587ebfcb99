// disk_pair: what the disk alone allows a synchronous replica on the same
// disk at queue depth 1. Each iteration writes 4 KiB at a random offset of
// file A with O_DIRECT (the primary's local write) and, at the same time from
// a second thread, 4 KiB at a random offset of file B with O_DIRECT|O_DSYNC
// (the mirror's durable write, which flushes the disk's cache); an
// iteration ends when both are done. Prints the median and the 99th
// percentile of the iteration time in microseconds, and of each write alone
// over the same number of iterations.
//
//   disk_pair FILE_A FILE_B SECONDS
//
// Both files must exist and be at least 64 MiB (bench/live.sh makes them).
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define MAX_ITERS 2000000

static int fd_a, fd_b;
static off_t blocks_a, blocks_b;
static pthread_barrier_t start_bar, end_bar;
static volatile int stop_flag;
static off_t next_b;

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static uint64_t rng = 88172645463325252ull;
static uint64_t xorshift(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void must_write(int fd, void *buf, off_t off, const char *what) {
    if (pwrite(fd, buf, BLOCK, off) != BLOCK) {
        perror(what);
        exit(1);
    }
}

static void *mirror_thread(void *arg) {
    void *buf = arg;
    for (;;) {
        pthread_barrier_wait(&start_bar);
        if (stop_flag) return NULL;
        must_write(fd_b, buf, next_b, "pwrite B (O_DIRECT|O_DSYNC)");
        pthread_barrier_wait(&end_bar);
    }
}

static int cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static void report(const char *name, double *v, long n) {
    qsort(v, n, sizeof(double), cmp);
    printf("%s p50_us %.1f p99_us %.1f n %ld\n", name, v[n / 2], v[(long)(n * 0.99)], n);
}

static off_t blocks_of(int fd, const char *path) {
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < (64 << 20)) {
        fprintf(stderr, "%s: want a file of at least 64 MiB\n", path);
        exit(2);
    }
    return st.st_size / BLOCK;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: disk_pair FILE_A FILE_B SECONDS\n");
        return 2;
    }
    double seconds = atof(argv[3]);
    if (seconds <= 0 || seconds > 600) {
        fprintf(stderr, "SECONDS must be in (0, 600]\n");
        return 2;
    }
    fd_a = open(argv[1], O_WRONLY | O_DIRECT);
    fd_b = open(argv[2], O_WRONLY | O_DIRECT | O_DSYNC);
    if (fd_a < 0 || fd_b < 0) {
        perror("open (O_DIRECT)");
        return 1;
    }
    blocks_a = blocks_of(fd_a, argv[1]);
    blocks_b = blocks_of(fd_b, argv[2]);
    void *buf_a, *buf_b;
    if (posix_memalign(&buf_a, BLOCK, BLOCK) || posix_memalign(&buf_b, BLOCK, BLOCK)) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    memset(buf_a, 0x5a, BLOCK);
    memset(buf_b, 0xa5, BLOCK);
    double *v = malloc(sizeof(double) * MAX_ITERS);
    if (!v) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    long n;
    double end;

    // Each write alone.
    const char *names[2] = {"direct", "dsync"};
    for (int which = 0; which < 2; which++) {
        n = 0;
        end = now_us() + seconds * 1e6 / 3;
        while (n < MAX_ITERS && now_us() < end) {
            double t0 = now_us();
            if (which == 0)
                must_write(fd_a, buf_a, (off_t)(xorshift() % blocks_a) * BLOCK, "pwrite A");
            else
                must_write(fd_b, buf_b, (off_t)(xorshift() % blocks_b) * BLOCK, "pwrite B");
            v[n++] = now_us() - t0;
        }
        report(names[which], v, n);
    }

    // Both at once, in lockstep.
    pthread_t th;
    pthread_barrier_init(&start_bar, NULL, 2);
    pthread_barrier_init(&end_bar, NULL, 2);
    if (pthread_create(&th, NULL, mirror_thread, buf_b) != 0) {
        fprintf(stderr, "cannot start a thread\n");
        return 1;
    }
    n = 0;
    end = now_us() + seconds * 1e6 / 3;
    while (n < MAX_ITERS && now_us() < end) {
        next_b = (off_t)(xorshift() % blocks_b) * BLOCK;
        off_t off_a = (off_t)(xorshift() % blocks_a) * BLOCK;
        double t0 = now_us();
        pthread_barrier_wait(&start_bar);
        must_write(fd_a, buf_a, off_a, "pwrite A");
        pthread_barrier_wait(&end_bar);
        v[n++] = now_us() - t0;
    }
    stop_flag = 1;
    pthread_barrier_wait(&start_bar);
    pthread_join(th, NULL);
    report("pair", v, n);
    return 0;
}
