/* A static test program for tests/test_apps_kernel.py: sleeps argv[1] ms,
 * then exits with argv[2]. */
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
    if (argc > 1) {
        long ms = atol(argv[1]);
        struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
        nanosleep(&ts, NULL);
    }
    return argc > 2 ? atoi(argv[2]) : 0;
}
