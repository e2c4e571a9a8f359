/* The floor of per-process accounting from user space (benchmarks/bench_sustained.py):
 * subscribe to the proc connector and to taskstats exit records (every CPU), drain both
 * with recvmmsg every NAP_MS milliseconds (batched, as elsad's burst hold reads), and do
 * nothing else. What a workload loses with it running is the kernel's cost of sending
 * the messages plus the cheapest possible reading of them.
 *
 *   gcc -O2 -o minreader minreader.c && ./minreader [NAP_MS] [CPUMASK] [EVENTS]
 *   (stops on SIGTERM/SIGINT; prints the messages read and its CPU time on stderr) */
#define _GNU_SOURCE
#include <linux/connector.h>
#include <linux/cn_proc.h>
#include <linux/genetlink.h>
#include <linux/netlink.h>
#include <linux/taskstats.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <sys/resource.h>
static volatile int stop;
static void on_sig(int s) { (void)s; stop = 1; }
#define NLA_DATA(na) ((void *)((char *)(na) + NLA_HDRLEN))
static int family_id(int fd) {
  struct { struct nlmsghdr n; struct genlmsghdr g; char buf[256]; } req = {0};
  req.n.nlmsg_type = GENL_ID_CTRL; req.n.nlmsg_flags = NLM_F_REQUEST; req.n.nlmsg_seq = 1;
  req.n.nlmsg_pid = getpid(); req.g.cmd = CTRL_CMD_GETFAMILY; req.g.version = 1;
  struct nlattr *na = (struct nlattr *)req.buf; na->nla_type = CTRL_ATTR_FAMILY_NAME;
  na->nla_len = NLA_HDRLEN + strlen(TASKSTATS_GENL_NAME) + 1;
  strcpy(NLA_DATA(na), TASKSTATS_GENL_NAME);
  req.n.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN) + NLA_ALIGN(na->nla_len);
  send(fd, &req, req.n.nlmsg_len, 0);
  char rb[4096]; int len = recv(fd, rb, sizeof rb, 0);
  struct nlmsghdr *n = (void *)rb; if (len < 0 || n->nlmsg_type == NLMSG_ERROR) return -1;
  na = (struct nlattr *)((char *)NLMSG_DATA(n) + GENL_HDRLEN);
  int rem = len - NLMSG_LENGTH(GENL_HDRLEN);
  while (rem > 0) { if (na->nla_type == CTRL_ATTR_FAMILY_ID) return *(unsigned short *)NLA_DATA(na);
    rem -= NLA_ALIGN(na->nla_len); na = (void *)((char *)na + NLA_ALIGN(na->nla_len)); }
  return -1;
}
int main(int argc, char **argv) {
  int nap_ms = argc > 1 ? atoi(argv[1]) : 50;
  const char *mask = argc > 2 ? argv[2] : "0-1";
  signal(SIGTERM, on_sig); signal(SIGINT, on_sig);
  int rcv = 32 << 20;
  int cn = socket(AF_NETLINK, SOCK_DGRAM, NETLINK_CONNECTOR);
  setsockopt(cn, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv);
  struct sockaddr_nl sa = {.nl_family = AF_NETLINK, .nl_groups = CN_IDX_PROC, .nl_pid = 0};
  if (bind(cn, (void *)&sa, sizeof sa) < 0) { perror("bind cn"); return 1; }
  /* EVENTS (Linux 6.6+): the event mask elsad asks for (struct proc_input); 0: every event. */
  unsigned events = argc > 3 ? (unsigned)strtoul(argv[3], NULL, 0) : 0;
  struct { struct nlmsghdr n; struct cn_msg c; unsigned op, events; } __attribute__((packed)) m = {0};
  m.c.len = events ? 8 : 4;
  m.n.nlmsg_len = sizeof m.n + sizeof m.c + m.c.len; m.n.nlmsg_type = NLMSG_DONE;
  m.n.nlmsg_pid = getpid(); m.c.id.idx = CN_IDX_PROC; m.c.id.val = CN_VAL_PROC;
  m.op = PROC_CN_MCAST_LISTEN; m.events = events;
  send(cn, &m, m.n.nlmsg_len, 0);
  int ts = socket(AF_NETLINK, SOCK_RAW, NETLINK_GENERIC);
  setsockopt(ts, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv);
  struct sockaddr_nl s2 = {.nl_family = AF_NETLINK}; bind(ts, (void *)&s2, sizeof s2);
  int fam = family_id(ts); if (fam < 0) { fprintf(stderr, "no taskstats\n"); return 1; }
  struct { struct nlmsghdr n; struct genlmsghdr g; char buf[64]; } r = {0};
  r.n.nlmsg_type = fam; r.n.nlmsg_flags = NLM_F_REQUEST; r.n.nlmsg_pid = getpid();
  r.g.cmd = TASKSTATS_CMD_GET; r.g.version = 1;
  struct nlattr *na = (void *)r.buf; na->nla_type = TASKSTATS_CMD_ATTR_REGISTER_CPUMASK;
  na->nla_len = NLA_HDRLEN + strlen(mask) + 1; strcpy(NLA_DATA(na), mask);
  r.n.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN) + NLA_ALIGN(na->nla_len);
  send(ts, &r, r.n.nlmsg_len, 0);
  enum { V = 256 };
  static char bufs[V][2048]; struct mmsghdr mm[V]; struct iovec io[V];
  for (int i = 0; i < V; i++) { io[i].iov_base = bufs[i]; io[i].iov_len = sizeof bufs[i];
    memset(&mm[i], 0, sizeof mm[i]); mm[i].msg_hdr.msg_iov = &io[i]; mm[i].msg_hdr.msg_iovlen = 1; }
  long ncn = 0, nts = 0;
  struct pollfd p[2] = {{cn, POLLIN, 0}, {ts, POLLIN, 0}};
  while (!stop) {
    if (poll(p, 2, 200) < 0) continue;
    int k;
    if (p[0].revents) while ((k = recvmmsg(cn, mm, V, MSG_DONTWAIT, NULL)) > 0) ncn += k;
    if (p[1].revents) while ((k = recvmmsg(ts, mm, V, MSG_DONTWAIT, NULL)) > 0) nts += k;
    if (nap_ms) usleep(nap_ms * 1000);
  }
  struct rusage ru; getrusage(RUSAGE_SELF, &ru);
  fprintf(stderr, "minreader: %ld cn_proc, %ld taskstats messages; cpu %.3f s\n", ncn, nts,
          ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
  return 0;
}
