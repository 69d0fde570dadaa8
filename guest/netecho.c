/*
 * ferry-netecho: the network side of Ferry's demo guest.
 *
 * Echoes every UDP datagram and every byte of every TCP connection it gets
 * on one port (default 7, the echo service), back to where it came from.
 * A client that probes the guest across a live migration (`ferry probe`)
 * counts the UDP probes that never came back, and checks that its TCP
 * connection stays open and gets back exactly the bytes it sent.
 *
 *   ferry-netecho [PORT]
 *
 * One process, one poll loop, no threads: up to 64 TCP connections, each
 * with a buffer of what it has read and not yet written back (it stops
 * reading a connection while that buffer is full, so a slow reader slows
 * only itself).  Prints "FERRY-NET-ECHO port=N" on start.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CONNS 64
#define BUF_BYTES 65536

struct conn {
    int fd;
    size_t have, sent; /* bytes in buf; bytes of them written back */
    char buf[BUF_BYTES];
};

static struct conn conns[MAX_CONNS];

static int listen_socket(int type, int port)
{
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0) return -1;
    if (type == SOCK_STREAM && listen(fd, 16) != 0) return -1;
    return fd;
}

static void drop(struct conn *c)
{
    close(c->fd);
    c->fd = -1;
    c->have = c->sent = 0;
}

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 7;
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "usage: ferry-netecho [PORT]\n");
        return 2;
    }
    int udp = listen_socket(SOCK_DGRAM, port);
    int tcp = listen_socket(SOCK_STREAM, port);
    if (udp < 0 || tcp < 0) {
        printf("FERRY-NET-ECHO-FAILED port=%d: %s\n", port, strerror(errno));
        return 1;
    }
    for (int i = 0; i < MAX_CONNS; i++) conns[i].fd = -1;
    printf("FERRY-NET-ECHO port=%d\n", port);
    fflush(stdout);

    for (;;) {
        struct pollfd fds[2 + MAX_CONNS];
        int index[2 + MAX_CONNS];
        int n = 0;
        fds[n++] = (struct pollfd){ .fd = udp, .events = POLLIN };
        fds[n++] = (struct pollfd){ .fd = tcp, .events = POLLIN };
        for (int i = 0; i < MAX_CONNS; i++) {
            struct conn *c = &conns[i];
            if (c->fd < 0) continue;
            short ev = 0;
            if (c->have < BUF_BYTES) ev |= POLLIN;
            if (c->sent < c->have) ev |= POLLOUT;
            index[n] = i;
            fds[n++] = (struct pollfd){ .fd = c->fd, .events = ev };
        }
        if (poll(fds, (nfds_t)n, -1) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        if (fds[0].revents & POLLIN) {
            /* Every datagram waiting, each sent straight back. */
            for (;;) {
                char d[2048];
                struct sockaddr_in from;
                socklen_t len = sizeof(from);
                ssize_t got = recvfrom(udp, d, sizeof(d), 0, (struct sockaddr *)&from, &len);
                if (got < 0) break;
                sendto(udp, d, (size_t)got, 0, (struct sockaddr *)&from, len);
            }
        }
        if (fds[1].revents & POLLIN) {
            for (;;) {
                int fd = accept4(tcp, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) break;
                int slot = -1;
                for (int i = 0; i < MAX_CONNS && slot < 0; i++)
                    if (conns[i].fd < 0) slot = i;
                if (slot < 0) {
                    close(fd);
                    continue;
                }
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                conns[slot].fd = fd;
                conns[slot].have = conns[slot].sent = 0;
            }
        }
        for (int k = 2; k < n; k++) {
            struct conn *c = &conns[index[k]];
            if (c->fd < 0 || fds[k].revents == 0) continue;
            if (fds[k].revents & POLLIN) {
                ssize_t got = read(c->fd, c->buf + c->have, BUF_BYTES - c->have);
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
                    drop(c);
                    continue;
                }
                if (got > 0) c->have += (size_t)got;
            } else if (fds[k].revents & (POLLERR | POLLHUP)) {
                drop(c);
                continue;
            }
            if (c->sent < c->have) {
                ssize_t put = write(c->fd, c->buf + c->sent, c->have - c->sent);
                if (put < 0 && errno != EAGAIN && errno != EINTR) {
                    drop(c);
                    continue;
                }
                if (put > 0) c->sent += (size_t)put;
                if (c->sent == c->have) c->have = c->sent = 0;
            }
        }
    }
}
