/* clone3(CLONE_INTO_CGROUP): a child born inside the cgroup whose directory
 * is open at dirfd, with no migration afterwards (Linux 5.7; docs/kernel.md,
 * "cgroup v2"). Shared by launcher.c and
 * cgroup_floor.c. */
#ifndef ELSA_CLONE_INTO_CGROUP_H
#define ELSA_CLONE_INTO_CGROUP_H

#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

/* Like fork(): 0 in the child, the child's pid in the parent, -1 on error. */
static pid_t clone_into_cgroup(int dirfd) {
    struct clone_args a;
    memset(&a, 0, sizeof a);
    a.flags = CLONE_INTO_CGROUP;
    a.exit_signal = SIGCHLD;
    a.cgroup = (uint64_t)dirfd;
    return (pid_t)syscall(SYS_clone3, &a, sizeof a);
}

#endif
