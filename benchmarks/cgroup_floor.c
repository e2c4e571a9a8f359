/* Kernel floor of the per-job cgroup v2 operations, without any daemon.
 *
 * Usage: cgroup_floor BASE N [MOUNT]
 *   BASE: an existing, empty cgroup v2 directory the caller may write (it is
 *         left as found: every cgroup made below it is removed).
 *   N:    iterations per variant.
 *   MOUNT: the cgroup2 mount (default /sys/fs/cgroup); join_migrate moves the
 *         caller back to its own cgroup below it at the end.
 *
 * One JSON line per variant: wall µs per iteration and CPU µs per iteration
 * (user and system, of this process and its reaped children). Variants:
 *
 *   mkdir_rmdir      mkdir + rmdir of a leaf cgroup
 *   mkdir_watch      + inotify_add_watch on its cgroup.events (rmdir drops it)
 *   join_migrate     the caller writes its pid into a new leaf's cgroup.procs,
 *                    then rmdir of the leaf it left (what a launcher that joins
 *                    the job does: one migration per job)
 *   child_migrate    fork a child that waits, write its pid into the new leaf's
 *                    cgroup.procs, let it _exit, reap it, rmdir (elsad's attach)
 *   clone_into       clone3(CLONE_INTO_CGROUP) a child straight into the new
 *                    leaf, it _exits, reap, rmdir (no migration at all)
 *   fork_only        fork + _exit + reap, no cgroup work (the reference)
 *   spawn_true       fork + exec /bin/true + reap (the launchers' own cost)
 *   clone_into_true  clone3(CLONE_INTO_CGROUP) + exec /bin/true + reap + rmdir
 *
 * Build: gcc -O2 -o cgroup_floor benchmarks/cgroup_floor.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clone_into_cgroup.h"

static char base[4096];
static char home[4096]; /* the caller's own cgroup directory, to return to */

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double tv(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

struct cpu { double user, sys; };

static struct cpu cpu_now(void) {
    struct rusage s, c;
    getrusage(RUSAGE_SELF, &s);
    getrusage(RUSAGE_CHILDREN, &c);
    return (struct cpu){tv(s.ru_utime) + tv(c.ru_utime), tv(s.ru_stime) + tv(c.ru_stime)};
}

static void leaf(char *out, size_t n, long i) { snprintf(out, n, "%s/f%ld", base, i); }

static void write_pid(const char *dir, pid_t pid) {
    char path[4200], buf[32];
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        die(path);
    int len = snprintf(buf, sizeof buf, "%d", (int)pid);
    if (write(fd, buf, len) != len)
        die("write cgroup.procs");
    close(fd);
}

static void reap(pid_t p) {
    if (waitpid(p, NULL, 0) != p)
        die("waitpid");
}

static void run(const char *name, long n, int variant) {
    char path[4200], prev[4200];
    char *argv[] = {"true", NULL};
    char *envp[] = {NULL};
    int ino = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    char evbuf[65536];
    prev[0] = 0;
    struct cpu c0 = cpu_now();
    double t0 = now();
    for (long i = 0; i < n; i++) {
        leaf(path, sizeof path, i);
        if (variant != 5 && variant != 6 && mkdir(path, 0755) < 0)
            die(path);
        switch (variant) {
        case 0:
            break;
        case 1: {
            snprintf(prev, sizeof prev, "%.4000s/cgroup.events", path);
            if (inotify_add_watch(ino, prev, IN_MODIFY) < 0)
                die("inotify_add_watch");
            prev[0] = 0;
            break;
        }
        case 2:
            write_pid(path, getpid());
            if (prev[0] && rmdir(prev) < 0)
                die(prev);
            strcpy(prev, path);
            continue;
        case 3: {
            int pfd[2];
            if (pipe(pfd) < 0)
                die("pipe");
            pid_t p = fork();
            if (p == 0) {
                char ch;
                close(pfd[1]);
                if (read(pfd[0], &ch, 1) < 0)
                    _exit(1);
                _exit(0);
            }
            close(pfd[0]);
            write_pid(path, p);
            if (write(pfd[1], "g", 1) != 1)
                die("write pipe");
            close(pfd[1]);
            reap(p);
            break;
        }
        case 4:
        case 7: {
            int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (fd < 0)
                die(path);
            pid_t p = clone_into_cgroup(fd);
            if (p == 0) {
                if (variant == 7)
                    execve("/bin/true", argv, envp);
                _exit(0);
            }
            if (p < 0)
                die("clone3");
            close(fd);
            reap(p);
            break;
        }
        case 5: {
            pid_t p = fork();
            if (p == 0)
                _exit(0);
            reap(p);
            continue;
        }
        case 6: {
            pid_t p = fork();
            if (p == 0) {
                execve("/bin/true", argv, envp);
                _exit(127);
            }
            reap(p);
            continue;
        }
        }
        /* rmdir right after the reap: the child left the cgroup at exit. */
        while (rmdir(path) < 0) {
            if (errno != EBUSY)
                die(path);
        }
        while (read(ino, evbuf, sizeof evbuf) > 0)
            ;
    }
    if (variant == 2) {
        write_pid(home, getpid());
        rmdir(prev);
    }
    double wall = now() - t0;
    struct cpu c1 = cpu_now();
    close(ino);
    printf("{\"variant\": \"%s\", \"n\": %ld, \"wall_us\": %.1f, \"user_us\": %.1f, "
           "\"sys_us\": %.1f, \"per_s\": %.0f}\n", name, n, wall / n * 1e6,
           (c1.user - c0.user) / n * 1e6, (c1.sys - c0.sys) / n * 1e6, n / wall);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s BASE N\n", argv[0]);
        return 2;
    }
    snprintf(base, sizeof base, "%s", argv[1]);
    /* home = the cgroup2 mount (BASE's ancestor given as argv[3], default the
     * parent of BASE) + our own v2 path from /proc/self/cgroup ("0::/x"). */
    FILE *f = fopen("/proc/self/cgroup", "r");
    char line[4096], own[4096] = "/";
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "0::", 3) == 0) {
            line[strcspn(line, "\n")] = 0;
            snprintf(own, sizeof own, "%s", line + 3);
        }
    if (f)
        fclose(f);
    snprintf(home, sizeof home, "%s%s", argc > 3 ? argv[3] : "/sys/fs/cgroup", own);
    long n = atol(argv[2]);
    static const char *names[] = {"mkdir_rmdir", "mkdir_watch", "join_migrate",
                                  "child_migrate", "clone_into", "fork_only",
                                  "spawn_true", "clone_into_true"};
    for (int v = 0; v < 8; v++)
        run(names[v], n, v);
    return 0;
}
