/* A batch launcher for benchmarks/bench_cgroup_jobs.py: N jobs, each running
 * /bin/true, through elsad's control socket, with no Python in the launcher.
 *
 * Usage: launcher MODE SOCKET N READY_FD GO_FD   (cgalone: a cgroup directory
 *        in place of SOCKET)
 *   Writes one byte to READY_FD once connected, waits for one byte on GO_FD
 *   (so every launcher starts together), runs N jobs, prints "N seconds".
 *
 * MODE:
 *   alone  no elsad: spawn /bin/true and reap it, N times (the ceiling).
 *   cgalone  no elsad either: SOCKET is instead a cgroup v2 directory; each job
 *          is a cgroup the launcher makes there itself: mkdir, clone3
 *          (CLONE_INTO_CGROUP) true into it, reap, rmdir. The ceiling of any
 *          cgroup-per-job launcher on this machine, with no daemon's cost.
 *   join   {"op":"create","pids":[me]}: the launcher joins a new job (elsad
 *          writes it into the job's cgroup.procs), then spawns true, born
 *          inside, and reaps it. Joining the next job takes the launcher out
 *          of the previous one, which then ends (`elsa-jobmng run` does this).
 *   clone  {"op":"create"} an empty job; clone3(CLONE_INTO_CGROUP) true
 *          straight into its cgroup (the reply's params.cgroup_path; no
 *          migration), then {"op":"attach"} it before reaping
 *          it (so the pid cannot be reused meanwhile; elsad takes a zombie
 *          born inside). The job ends by itself when true exits. The attach
 *          of job k and the create of job k+1 go in one write (the protocol
 *          answers pipelined requests in order).
 *
 * Every reply is checked ("ok":true); durable ops (create, attach) are
 * answered by elsad only once committed to its store.
 *
 * Build: gcc -O2 -o launcher benchmarks/launcher.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clone_into_cgroup.h"

extern char **environ;

static int sock = -1;
static char inbuf[1 << 16];
static size_t inlen;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void send_all(const char *buf, size_t len) {
    while (len) {
        ssize_t n = write(sock, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("write socket");
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* The next reply line (NUL-terminated, without the newline) in *line*. */
static void read_line(char *line, size_t cap) {
    for (;;) {
        char *nl = memchr(inbuf, '\n', inlen);
        if (nl) {
            size_t n = (size_t)(nl - inbuf);
            if (n + 1 > cap) {
                fprintf(stderr, "reply too long\n");
                exit(1);
            }
            memcpy(line, inbuf, n);
            line[n] = 0;
            memmove(inbuf, nl + 1, inlen - n - 1);
            inlen -= n + 1;
            return;
        }
        if (inlen == sizeof inbuf) {
            fprintf(stderr, "reply too long\n");
            exit(1);
        }
        ssize_t r = read(sock, inbuf + inlen, sizeof inbuf - inlen);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            fprintf(stderr, "elsad closed the connection\n");
            exit(1);
        }
        inlen += (size_t)r;
    }
}

static void expect_ok(const char *line, const char *op) {
    if (!strstr(line, "\"ok\":true")) {
        fprintf(stderr, "%s failed: %s\n", op, line);
        exit(1);
    }
}

/* A create reply: the job id and its cgroup directory. */
static uint64_t parse_job(const char *line, char *path, size_t cap) {
    expect_ok(line, "create");
    const char *j = strstr(line, "\"jid\":");
    const char *p = strstr(line, "\"cgroup_path\":\"");
    if (!j || !p) {
        fprintf(stderr, "create reply without jid or cgroup_path: %s\n", line);
        exit(1);
    }
    j += 6;
    if (*j == '"')
        j++; /* a zero-padded hex string, "0x0035969e00000402" (docs/jobid.md) */
    uint64_t jid = strtoull(j, NULL, 0);
    p += strlen("\"cgroup_path\":\"");
    const char *e = strchr(p, '"');
    size_t n = e ? (size_t)(e - p) : 0;
    if (!e || n + 1 > cap || memchr(p, '\\', n)) {
        fprintf(stderr, "unexpected cgroup_path in %s\n", line);
        exit(1);
    }
    memcpy(path, p, n);
    path[n] = 0;
    return jid;
}

static pid_t spawn_true(void) {
    char *argv[] = {"true", NULL};
    pid_t pid;
    int err = posix_spawn(&pid, "/bin/true", NULL, NULL, argv, environ);
    if (err) {
        errno = err;
        die("posix_spawn /bin/true");
    }
    return pid;
}

static pid_t clone_true_into(int dirfd) {
    pid_t pid = clone_into_cgroup(dirfd);
    if (pid == 0) {
        char *argv[] = {"true", NULL};
        execve("/bin/true", argv, environ);
        _exit(127);
    }
    if (pid < 0)
        die("clone3(CLONE_INTO_CGROUP)");
    return pid;
}

static void reap(pid_t pid) {
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "true failed: status %d\n", status);
        exit(1);
    }
}

static const char CREATE[] = "{\"op\":\"create\",\"name\":\"bench\"}\n";

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s alone|cgalone|join|clone SOCKET|CGROUP_DIR N READY_FD GO_FD\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    long n = atol(argv[3]);
    int ready = atoi(argv[4]), go = atoi(argv[5]);
    if (strcmp(mode, "alone") != 0 && strcmp(mode, "cgalone") != 0) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        snprintf(addr.sun_path, sizeof addr.sun_path, "%s", argv[2]);
        sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
            die(argv[2]);
    }
    char c = 'r';
    if (write(ready, &c, 1) != 1 || read(go, &c, 1) != 1)
        die("start pipes");
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    static char line[1 << 16], path[4096], req[512];
    if (strcmp(mode, "alone") == 0) {
        for (long i = 0; i < n; i++)
            reap(spawn_true());
    } else if (strcmp(mode, "cgalone") == 0) {
        for (long i = 0; i < n; i++) {
            snprintf(path, sizeof path, "%s/l%d-%ld", argv[2], (int)getpid(), i);
            if (mkdir(path, 0755) < 0)
                die(path);
            int dirfd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
            if (dirfd < 0)
                die(path);
            reap(clone_true_into(dirfd));
            close(dirfd);
            if (rmdir(path) < 0)
                die(path);
        }
    } else if (strcmp(mode, "join") == 0) {
        int len = snprintf(req, sizeof req, "{\"op\":\"create\",\"name\":\"bench\",\"pids\":[%d]}\n",
                           (int)getpid());
        for (long i = 0; i < n; i++) {
            send_all(req, (size_t)len);
            read_line(line, sizeof line);
            expect_ok(line, "create");
            reap(spawn_true());
        }
    } else if (strcmp(mode, "clone") == 0) {
        send_all(CREATE, sizeof CREATE - 1);
        read_line(line, sizeof line);
        uint64_t jid = parse_job(line, path, sizeof path);
        for (long i = 0; i < n; i++) {
            int dirfd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
            if (dirfd < 0)
                die(path);
            pid_t pid = clone_true_into(dirfd);
            close(dirfd);
            int len = snprintf(req, sizeof req,
                               "{\"op\":\"attach\",\"jid\":\"0x%016llx\",\"pids\":[%d]}\n%s",
                               (unsigned long long)jid, (int)pid, i + 1 < n ? CREATE : "");
            send_all(req, (size_t)len);
            read_line(line, sizeof line);
            expect_ok(line, "attach");
            reap(pid); /* only now: until the attach is answered the pid is ours */
            if (i + 1 < n) {
                read_line(line, sizeof line);
                jid = parse_job(line, path, sizeof path);
            }
        }
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%ld %.6f\n", n, (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
