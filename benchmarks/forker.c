/* Fork storm for benchmarks: waits for one byte on stdin (so the caller can
 * put it in a job first), then forks N children that exit at once, reaping
 * each, as fast as the kernel allows. Prints the forks/s it achieved. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10000;
    char c;
    if (read(0, &c, 1) != 1)
        return 2;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0)
            _exit(0);
        if (p < 0)
            return 1;
        waitpid(p, NULL, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%ld %.3f %.0f\n", n, s, n / s);
    return 0;
}
