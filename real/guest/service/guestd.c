/* ftvm-guestd: the test guest's service. A small HTTP/1.1 server (keep-alive, pipelining)
 * whose only state is in RAM:
 *   GET /incr                  add 1 to the counter, reply with the new value
 *   GET /get                   reply with the counter
 *   GET /dirty                 reply with the dirtying rate in effect (pages per second)
 *   GET /dirty?pages=N[&mode=scatter|seq]  set it, reply with the rate in effect
 *   GET /status                key=value lines: counter, dirtying figures, requests,
 *                              connections, uptime (seconds since boot)
 * Every reply has Content-Length; bodies end with a newline.
 *
 * One thread serves all connections with poll(); the dirtier runs in its own thread.
 * Nothing depends on wall-clock time, so the process carries on unchanged after its VM is
 * checkpointed and restored. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

#include "dirtier.h"
#include "http.h"

#define READY_MARKER "FTVM-GUEST-READY"
#define MAX_CONNS 256
#define IN_MAX 8192
#define OUT_MAX 16384
/* Room a single reply may need; input is not processed while less is free. */
#define REPLY_MAX 1024

struct conn {
    int fd;
    int close_after;               /* no more requests: close once the output is flushed */
    unsigned long long skip;       /* request-body bytes still to discard */
    size_t in_len;
    size_t out_off, out_len;
    char in[IN_MAX];
    char out[OUT_MAX];
};

static unsigned long long counter;
static unsigned long long requests;
static struct conn *conns[MAX_CONNS];
static size_t nconns;

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s [-p PORT] [-d PAGES_PER_SEC] [-m DIRTY_BUFFER_MIB] [-M scatter|seq]\n",
            argv0);
}

/* Strict decimal parse: digits only, value <= max. Returns 0 on success. */
static int parse_uint(const char *s, unsigned long long max, unsigned long long *out)
{
    unsigned long long v = 0;
    if (*s == '\0')
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (unsigned)(*s - '0');
        if (v > max)
            return -1;
    }
    *out = v;
    return 0;
}

/* Appends a complete reply to c->out. The caller made sure REPLY_MAX bytes are free. */
static void reply(struct conn *c, const struct http_request *req, int status, const char *reason,
                  const char *body, const char *extra_headers)
{
    size_t blen = strlen(body);
    int head_only = req && strcmp(req->method, "HEAD") == 0;
    int n;

    if (c->out_off > 0) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    n = snprintf(c->out + c->out_len, OUT_MAX - c->out_len,
                 "HTTP/1.1 %d %s\r\n"
                 "Content-Type: text/plain\r\n"
                 "Content-Length: %zu\r\n"
                 "Cache-Control: no-store\r\n"
                 "Connection: %s\r\n"
                 "%s"
                 "\r\n"
                 "%s",
                 status, reason, blen, c->close_after ? "close" : "keep-alive",
                 extra_headers ? extra_headers : "", head_only ? "" : body);
    if (n < 0 || (size_t)n >= OUT_MAX - c->out_len) {
        /* Cannot happen with REPLY_MAX free; never send a truncated reply. */
        c->close_after = 1;
        return;
    }
    c->out_len += (size_t)n;
}

/* Seconds since the guest booted (not wall-clock time). */
static double uptime_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_BOOTTIME, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void handle_dirty(struct conn *c, const struct http_request *req)
{
    char value[32], body[64];
    unsigned long long pages;
    enum dirty_mode mode;
    struct dirtier_stats st;

    if (http_query_get(req->query, "mode", value, sizeof value)) {
        if (dirty_mode_parse(value, &mode) != 0) {
            reply(c, req, 400, "Bad Request", "mode must be scatter or seq\n", NULL);
            return;
        }
        dirtier_set_mode(mode);
    }
    if (http_query_get(req->query, "pages", value, sizeof value)) {
        if (parse_uint(value, 4000000000ULL, &pages) != 0) {
            reply(c, req, 400, "Bad Request", "pages must be a number of pages per second\n",
                  NULL);
            return;
        }
        dirtier_set_rate((unsigned)pages);
    }
    dirtier_get_stats(&st);
    snprintf(body, sizeof body, "%u\n", st.rate);
    reply(c, req, 200, "OK", body, NULL);
}

static void handle_status(struct conn *c, const struct http_request *req)
{
    char body[512];
    struct dirtier_stats st;

    dirtier_get_stats(&st);
    snprintf(body, sizeof body,
             "counter=%llu\n"
             "dirty_rate=%u\n"
             "dirty_mode=%s\n"
             "dirty_buffer_pages=%zu\n"
             "dirty_written=%llu\n"
             "requests=%llu\n"
             "connections=%zu\n"
             "uptime=%.3f\n",
             counter, st.rate, dirty_mode_name(st.mode), st.buffer_pages, st.written, requests,
             nconns, uptime_seconds());
    reply(c, req, 200, "OK", body, NULL);
}

static void handle(struct conn *c, const struct http_request *req)
{
    char body[64];

    requests++;
    if (strcmp(req->method, "GET") != 0 && strcmp(req->method, "HEAD") != 0 &&
        strcmp(req->method, "POST") != 0) {
        reply(c, req, 405, "Method Not Allowed", "method not allowed\n",
              "Allow: GET, HEAD, POST\r\n");
        return;
    }
    if (strcmp(req->path, "/incr") == 0) {
        counter++;
        snprintf(body, sizeof body, "%llu\n", counter);
        reply(c, req, 200, "OK", body, NULL);
    } else if (strcmp(req->path, "/get") == 0) {
        snprintf(body, sizeof body, "%llu\n", counter);
        reply(c, req, 200, "OK", body, NULL);
    } else if (strcmp(req->path, "/dirty") == 0) {
        handle_dirty(c, req);
    } else if (strcmp(req->path, "/status") == 0) {
        handle_status(c, req);
    } else if (strcmp(req->path, "/") == 0) {
        reply(c, req, 200, "OK",
              "ftvm guest: /incr /get /dirty[?pages=N[&mode=scatter|seq]] /status\n", NULL);
    } else {
        reply(c, req, 404, "Not Found", "not found\n", NULL);
    }
}

/* Drops n bytes from the front of the input buffer. */
static void consume(struct conn *c, size_t n)
{
    memmove(c->in, c->in + n, c->in_len - n);
    c->in_len -= n;
}

/* Serves every complete request in the input buffer while there is room for replies. */
static void serve(struct conn *c)
{
    struct http_request req;
    long r;

    for (;;) {
        if (c->close_after) {
            c->in_len = 0; /* nothing after a closing request is read */
            return;
        }
        if (c->skip) {
            size_t n = c->skip < c->in_len ? (size_t)c->skip : c->in_len;
            consume(c, n);
            c->skip -= n;
            if (c->skip)
                return;
        }
        if (OUT_MAX - (c->out_len - c->out_off) < REPLY_MAX)
            return; /* wait until the client reads its replies */
        r = http_parse(c->in, c->in_len, &req);
        if (r == HTTP_INCOMPLETE) {
            if (c->in_len == IN_MAX) {
                c->close_after = 1;
                reply(c, NULL, 431, "Request Header Fields Too Large", "request too large\n",
                      NULL);
            }
            return;
        }
        if (r == HTTP_BAD || r == HTTP_UNSUPPORTED) {
            c->close_after = 1;
            if (r == HTTP_BAD)
                reply(c, NULL, 400, "Bad Request", "bad request\n", NULL);
            else
                reply(c, NULL, 501, "Not Implemented", "chunked bodies are not supported\n",
                      NULL);
            return;
        }
        consume(c, (size_t)r);
        c->skip = req.body_len;
        if (!req.keep_alive)
            c->close_after = 1;
        handle(c, &req);
    }
}

/* Sends what it can. Returns -1 if the connection failed. */
static int flush(struct conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -1;
        }
        c->out_off += (size_t)n;
    }
    c->out_off = c->out_len = 0;
    return 0;
}

/* Reads what is available. Returns -1 on error, 0 on EOF, 1 otherwise. */
static int fill(struct conn *c)
{
    while (c->in_len < IN_MAX) {
        ssize_t n = recv(c->fd, c->in + c->in_len, IN_MAX - c->in_len, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 1;
            return -1;
        }
        if (n == 0)
            return 0;
        c->in_len += (size_t)n;
    }
    return 1;
}

static void drop(size_t i)
{
    close(conns[i]->fd);
    free(conns[i]);
    conns[i] = conns[--nconns];
}

static void accept_all(int lfd)
{
    for (;;) {
        int one = 1, keep_idle = 60, keep_intvl = 10, keep_cnt = 3;
        struct conn *c;
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return; /* EAGAIN, or out of descriptors: retry on the next poll */
        }
        if (nconns == MAX_CONNS || !(c = calloc(1, sizeof *c))) {
            close(fd);
            continue;
        }
        /* Replies are small and each is one send: do not let Nagle hold them back. */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        /* A client that vanished (e.g. its side of a failover) must not hold a slot forever:
         * probe after 60 s of silence, give up after 3 unanswered probes 10 s apart. */
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &keep_idle, sizeof keep_idle);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &keep_intvl, sizeof keep_intvl);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &keep_cnt, sizeof keep_cnt);
        c->fd = fd;
        conns[nconns++] = c;
    }
}

static int listen_on(int port)
{
    int one = 1;
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 128) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Caps the dirtying buffer at half the guest's RAM, so the knob cannot get the service killed. */
static unsigned long long cap_buffer_mib(unsigned long long mib)
{
    struct sysinfo si;
    unsigned long long half;
    if (sysinfo(&si) != 0)
        return mib;
    half = (unsigned long long)si.totalram * si.mem_unit / 2 / (1024 * 1024);
    if (mib > half && half > 0) {
        fprintf(stderr, "ftvm-guestd: dirty buffer %llu MiB capped at %llu MiB (half of RAM)\n",
                mib, half);
        return half;
    }
    return mib;
}

int main(int argc, char **argv)
{
    unsigned long long port = 80, rate = 0, mib = 64, v;
    enum dirty_mode mode = DIRTY_SCATTER;
    struct pollfd pfds[MAX_CONNS + 1];
    int opt, lfd, e;

    while ((opt = getopt(argc, argv, "p:d:m:M:h")) != -1) {
        switch (opt) {
        case 'p':
            if (parse_uint(optarg, 65535, &port) != 0 || port == 0)
                goto bad;
            break;
        case 'd':
            if (parse_uint(optarg, 4000000000ULL, &rate) != 0)
                goto bad;
            break;
        case 'm':
            if (parse_uint(optarg, 1ULL << 20, &v) != 0 || v == 0)
                goto bad;
            mib = v;
            break;
        case 'M':
            if (dirty_mode_parse(optarg, &mode) != 0)
                goto bad;
            break;
        default:
            goto bad;
        }
    }
    if (optind != argc)
        goto bad;

    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    mib = cap_buffer_mib(mib);
    if ((e = dirtier_start((size_t)mib * 1024 * 1024, (unsigned)rate, mode)) != 0) {
        fprintf(stderr, "ftvm-guestd: cannot start the dirtier (%llu MiB): %s\n", mib,
                strerror(-e));
        return 1;
    }
    lfd = listen_on((int)port);
    if (lfd < 0) {
        fprintf(stderr, "ftvm-guestd: cannot listen on port %llu: %s\n", port, strerror(errno));
        return 1;
    }
    {
        struct dirtier_stats st;
        dirtier_get_stats(&st);
        printf("%s port=%llu dirty=%u dirtymb=%llu mode=%s uptime=%.2f\n", READY_MARKER, port,
               st.rate, mib, dirty_mode_name(st.mode), uptime_seconds());
    }

    for (;;) {
        size_t i, n = nconns;
        int r;

        pfds[0].fd = lfd;
        pfds[0].events = nconns < MAX_CONNS ? POLLIN : 0;
        for (i = 0; i < n; i++) {
            struct conn *c = conns[i];
            pfds[i + 1].fd = c->fd;
            pfds[i + 1].events = 0;
            if (!c->close_after && c->in_len < IN_MAX &&
                OUT_MAX - (c->out_len - c->out_off) >= REPLY_MAX)
                pfds[i + 1].events |= POLLIN;
            if (c->out_off < c->out_len)
                pfds[i + 1].events |= POLLOUT;
        }
        r = poll(pfds, n + 1, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            perror("ftvm-guestd: poll");
            return 1;
        }
        /* Walk backwards: drop() moves the last connection into the freed slot. */
        for (i = n; i-- > 0;) {
            struct conn *c = conns[i];
            short re = pfds[i + 1].revents;
            int ok = 1;
            if (!re)
                continue;
            if (re & (POLLIN | POLLHUP | POLLERR)) {
                int f = fill(c);
                if (f < 0) {
                    drop(i);
                    continue;
                }
                serve(c);
                if (f == 0) {
                    c->close_after = 1; /* the client is done sending: reply, then close */
                }
            }
            if (flush(c) < 0)
                ok = 0;
            else if (c->out_len == 0 && !c->close_after) {
                serve(c); /* input held back for lack of output room */
                if (flush(c) < 0)
                    ok = 0;
            }
            if (!ok || (c->close_after && c->out_len == 0))
                drop(i);
        }
        if (pfds[0].revents & POLLIN)
            accept_all(lfd);
    }

bad:
    usage(argv[0]);
    return 2;
}
