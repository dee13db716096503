/* The kernel's own cost of what `labctl status LAB` asks of each node, at C speed.
 *
 * Per namespace whose name starts with PREFIX: open and setns, one rtnetlink
 * socket with the link, address, route and qdisc dumps, and one nfnetlink
 * socket with the nf_tables table dump -- the reads status makes, without
 * Python.  Nothing is changed; the thread returns to its namespace at the end.
 *
 *     gcc -O2 -o /tmp/status_floor bench/status_floor.c
 *     /usr/bin/time -f '%e s wall, %S s system' /tmp/status_floor labctl-bnstar1000.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static char buf[1 << 16];
static long bytes, msgs;

static void dump(int s, int type, const void *body, int blen) {
    struct {
        struct nlmsghdr h;
        char b[64];
    } req = {0};
    req.h.nlmsg_len = NLMSG_LENGTH(blen);
    req.h.nlmsg_type = type;
    req.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.h.nlmsg_seq = 1;
    memcpy(req.b, body, blen);
    send(s, &req, req.h.nlmsg_len, 0);
    for (;;) {
        int n = recv(s, buf, sizeof buf, 0);
        if (n <= 0)
            return;
        bytes += n;
        for (struct nlmsghdr *h = (void *)buf; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
            msgs++;
            if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR)
                return;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s NAMESPACE-PREFIX (e.g. labctl-bnstar1000.)\n", argv[0]);
        return 2;
    }
    const char *prefix = argv[1];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int self = open("/proc/self/ns/net", O_RDONLY);
    DIR *d = opendir("/run/netns");
    struct dirent *e;
    int count = 0;
    while (d && (e = readdir(d))) {
        if (strncmp(e->d_name, prefix, strlen(prefix)))
            continue;
        char path[512];
        snprintf(path, sizeof path, "/run/netns/%s", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
            if (fd >= 0)
                close(fd);
            continue;
        }
        close(fd);
        int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
        int f = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
        struct ifinfomsg ifi = {0};
        struct ifaddrmsg ifa = {0};
        struct rtmsg rt = {0};
        struct tcmsg tc = {0};
        struct nfgenmsg g = {0};
        dump(s, RTM_GETLINK, &ifi, sizeof ifi);
        dump(s, RTM_GETADDR, &ifa, sizeof ifa);
        dump(s, RTM_GETROUTE, &rt, sizeof rt);
        dump(s, RTM_GETQDISC, &tc, sizeof tc);
        dump(f, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE, &g, sizeof g);
        close(f);
        close(s);
        count++;
    }
    setns(self, CLONE_NEWNET);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%d namespaces, %ld messages, %ld bytes: %.3f s\n", count, msgs, bytes,
           (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
