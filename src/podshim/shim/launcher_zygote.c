/*
 * The launcher's zygote client: a new pod's `start` without Python.
 *
 * The exchange is the one src/podshim/shim/zygote.py describes (and start.py's `listen`
 * for the socket): listen at the shim socket path (bound under a temporary name, then
 * hard-linked into place, so the path never names a socket that refuses connections),
 * send the zygote one line of JSON with the listening socket as the only SCM_RIGHTS fd,
 * read {"v": 2, "pid": N}, send the go byte.  Until the go is sent nothing is committed:
 * on any failure the socket file this program linked is removed again (only if it is
 * still that file) and the caller execs the Python shim, which does it all itself
 * (spawning the zygote when none listens, or a daemon of its own).
 *
 * This file is podshim's own code; it is compiled with launcher.c (setup.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "launcher.h"

#define ZYGOTE_PROTOCOL 2
#define ZYGOTE_GO '\x01'
#define ZYGOTE_TIMEOUT 10.0 /* zygote.TIMEOUT; PODSHIM_ZYGOTE_TIMEOUT overrides */
#define REQUEST_MAX 16384

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A JSON string of `s`: printable ASCII only (anything else: -1, Python decides). */
static int json_str(char *out, size_t size, size_t *n, const char *s) {
    if (*n + 1 >= size) return -1;
    out[(*n)++] = '"';
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c > 0x7e) return -1;
        if (c == '"' || c == '\\') {
            if (*n + 1 >= size) return -1;
            out[(*n)++] = '\\';
        }
        if (*n + 1 >= size) return -1;
        out[(*n)++] = (char)c;
    }
    if (*n + 1 >= size) return -1;
    out[(*n)++] = '"';
    return 0;
}

static int put(char *out, size_t size, size_t *n, const char *s) {
    size_t len = strlen(s);
    if (*n + len >= size) return -1;
    memcpy(out + *n, s, len);
    *n += len;
    return 0;
}

/* The request line (zygote.REQUEST_FIELDS, in start's order). */
static int request(char *out, size_t size, const struct zygote_ask *a) {
    size_t n = 0;
    char num[64];
    snprintf(num, sizeof num, "{\"v\": %d, \"namespace\": ", ZYGOTE_PROTOCOL);
    if (put(out, size, &n, num) || json_str(out, size, &n, a->namespace) ||
        put(out, size, &n, ", \"id\": ") || json_str(out, size, &n, a->id) ||
        put(out, size, &n, ", \"address\": ") || json_str(out, size, &n, a->address) ||
        put(out, size, &n, ", \"bundle\": ") || json_str(out, size, &n, a->bundle) ||
        put(out, size, &n, ", \"socket\": ") || json_str(out, size, &n, a->socket))
        return -1;
    snprintf(num, sizeof num, ", \"debug\": %s, \"containerd_pid\": %ld}\n",
             a->debug ? "true" : "false", (long)getppid());
    if (put(out, size, &n, num)) return -1;
    return (int)n;
}

/* os.makedirs(dirname(path), 0o700, exist_ok=True), as start.listen does. */
static int make_parents(const char *path) {
    char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
    if (strlen(path) >= sizeof dir) return -1;
    strcpy(dir, path);
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(dir, 0700) < 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    return 0;
}

/* start.listen: the socket listening at `path`, linked there by this call; -1 when a
 * file is there already (a live shim or a stale one: Python sorts that out). */
static int listen_at(const char *path, struct stat *linked) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    char tmp[sizeof sa.sun_path];
    if (make_parents(path) < 0) return -1;
    if (snprintf(tmp, sizeof tmp, "%s.%ld", path, (long)getpid()) >= (int)sizeof tmp) return -1;
    memcpy(sa.sun_path, tmp, strlen(tmp) + 1);
    int s = socket(AF_UNIX, SOCK_STREAM, 0); /* no CLOEXEC: the zygote gets a dup anyway */
    if (s < 0) return -1;
    unlink(tmp);
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) < 0) goto fail;
    if (chmod(tmp, 0600) < 0 || listen(s, 128) < 0 || link(tmp, path) < 0) {
        unlink(tmp);
        goto fail;
    }
    unlink(tmp);
    if (lstat(path, linked) < 0) {
        close(s);
        return -1; /* gone at once: nothing of ours is left to remove */
    }
    return s;
fail:
    close(s);
    return -1;
}

/* Undo listen_at: remove `path` only while it is still the file this program linked. */
static void unlisten(int s, const char *path, const struct stat *linked) {
    struct stat st;
    if (lstat(path, &st) == 0 && st.st_dev == linked->st_dev && st.st_ino == linked->st_ino)
        unlink(path);
    close(s);
}

/* Read one line (up to `size` - 1 bytes) before `deadline`. */
static int read_line(int c, char *buf, size_t size, double deadline) {
    size_t n = 0;
    while (n + 1 < size && !memchr(buf, '\n', n)) {
        double left = deadline - now();
        if (left <= 0) return -1;
        struct pollfd p = {.fd = c, .events = POLLIN};
        int r = poll(&p, 1, (int)(left * 1000) + 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        ssize_t got = read(c, buf + n, size - 1 - n);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        n += (size_t)got;
        buf[n] = 0;
    }
    buf[n] = 0;
    return (int)n;
}

/* The daemon's pid from the zygote's answer; -1 for an error or anything unexpected. */
static long answer_pid(const char *line) {
    const char *p = strstr(line, "\"pid\":");
    if (strstr(line, "\"error\"") || !p) return -1;
    char *end;
    long pid = strtol(p + 6, &end, 10);
    if (pid <= 0 || end == p + 6) return -1;
    char want[32];
    snprintf(want, sizeof want, "\"v\": %d", ZYGOTE_PROTOCOL);
    return strstr(line, want) ? pid : -1; /* an older zygote: Python knows that exchange */
}

static double timeout(void) {
    const char *env = getenv("PODSHIM_ZYGOTE_TIMEOUT");
    if (env && *env) {
        char *end;
        double t = strtod(env, &end);
        if (end != env && !*end && t > 0) return t;
    }
    return ZYGOTE_TIMEOUT;
}

int zygote_start(const struct zygote_ask *a) {
    char line[REQUEST_MAX], answer[4096];
    struct stat linked;
    struct sockaddr_un za = {.sun_family = AF_UNIX};
    int len = request(line, sizeof line, a);
    if (len < 0 || strlen(a->zygote) >= sizeof za.sun_path) return -1;
    memcpy(za.sun_path, a->zygote, strlen(a->zygote) + 1);

    int c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c < 0) return -1;
    if (connect(c, (struct sockaddr *)&za, sizeof za) < 0) { /* no zygote: Python spawns it */
        close(c);
        return -1;
    }
    double deadline = now() + timeout();
    int s = listen_at(a->socket, &linked);
    if (s < 0) {
        close(c);
        return -1;
    }
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = line, .iov_len = (size_t)len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &s, sizeof(int));
    ssize_t sent;
    do sent = sendmsg(c, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    char go = ZYGOTE_GO;
    if (sent != len || read_line(c, answer, sizeof answer, deadline) <= 0 ||
        answer_pid(answer) < 0 || send(c, &go, 1, MSG_NOSIGNAL) != 1) {
        /* not committed: a forked daemon that never gets the go never serves */
        close(c);
        unlisten(s, a->socket, &linked);
        return -1;
    }
    close(c);
    close(s); /* the daemon holds its own copy */
    return 0;
}
