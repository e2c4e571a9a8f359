/* Workload of benchmarks/cpu_sources_gap.py: forks CHILDREN children one at
 * a time, each spinning CHILD_US µs (0: exits at once), reaping each; then
 * spins SELF_US µs itself. The spin reads CLOCK_MONOTONIC, which the vDSO
 * answers without entering the kernel: a CPU-time clock would be a system
 * call that brings the task's runtime up to date each time, which a
 * program that computes does not do.
 * usage: spinfork CHILDREN CHILD_US SELF_US */
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void spin(long us) {
    struct timespec t;
    long long end, now;
    if (us <= 0)
        return;
    clock_gettime(CLOCK_MONOTONIC, &t);
    end = t.tv_sec * 1000000000LL + t.tv_nsec + us * 1000LL;
    do {
        clock_gettime(CLOCK_MONOTONIC, &t);
        now = t.tv_sec * 1000000000LL + t.tv_nsec;
    } while (now < end);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 0;
    long child_us = argc > 2 ? atol(argv[2]) : 0;
    long self_us = argc > 3 ? atol(argv[3]) : 0;
    for (long i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0) {
            spin(child_us);
            _exit(0);
        }
        if (p < 0)
            return 1;
        waitpid(p, NULL, 0);
    }
    spin(self_us);
    return 0;
}
