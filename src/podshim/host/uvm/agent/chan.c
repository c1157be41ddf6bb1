/* The host channel: a unix socket (one connection at a time) or the virtio-serial port;
 * ttrpc framing in and out.
 *
 * A frame header declaring more than MAX_FRAME bytes, or stream 0, ends the connection
 * (nothing can be answered on it); so does the peer closing. Ending a connection drops
 * its partial frame, its unsent answers and its pending calls, and nothing else: keys,
 * processes and buffered output stay for the next connection.
 */
#include "agent.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define SERVICE "podshim.agent.v1.Agent"

static int lfd = -1;  /* unix listener (--listen) */
static int cfd = -1;  /* the connection: accepted socket, or the port */
static int is_port;   /* cfd is the virtio-serial port (never closed) */
static int hung;      /* the port's host side is disconnected */
static int idx = -1;  /* our pollfd slot */
static struct buf in, out;
static uint64_t generation = 1;

uint64_t chan_generation(void)
{
	return generation;
}

void chan_listen(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(sa.sun_path)) {
		logmsg(3, "socket path too long: %s", path);
		exit(2);
	}
	strcpy(sa.sun_path, path);
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	unlink(path);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) || listen(lfd, 16)) {
		logmsg(3, "listen on %s: %s", path, strerror(errno));
		exit(1);
	}
}

void chan_port(int fd)
{
	cfd = fd;
	is_port = 1;
	set_nonblock(fd);
}

static void disconnect(const char *why)
{
	logmsg(6, "host connection ended (%s): %zu bytes of a partial frame dropped", why, in.len);
	if (is_port) {
		hung = 1;
	} else {
		close(cfd);
		cfd = -1;
	}
	buf_free(&in);
	buf_free(&out);
	pending_drop_all();
	generation++;
}

static void put_header(uint8_t *h, uint32_t len, uint32_t sid, uint8_t type)
{
	h[0] = (uint8_t)(len >> 24);
	h[1] = (uint8_t)(len >> 16);
	h[2] = (uint8_t)(len >> 8);
	h[3] = (uint8_t)len;
	h[4] = (uint8_t)(sid >> 24);
	h[5] = (uint8_t)(sid >> 16);
	h[6] = (uint8_t)(sid >> 8);
	h[7] = (uint8_t)sid;
	h[8] = type;
	h[9] = 0;
}

static void send_response(uint32_t sid, const struct buf *body)
{
	if (cfd < 0 || hung)
		return;
	uint8_t h[10];
	put_header(h, (uint32_t)body->len, sid, 2);
	buf_append(&out, h, sizeof(h));
	buf_append(&out, BUF_DATA(body), body->len);
}

void reply_ok(uint32_t sid, const struct buf *payload)
{
	struct buf body = {0};
	if (payload && payload->len > REPLY_MAX) {
		reply_err(sid, C_EXHAUSTED, "answer of %zu bytes over the limit", payload->len);
		return;
	}
	if (payload)
		pb_bytes(&body, 2, BUF_DATA(payload), payload->len);
	send_response(sid, &body);
	buf_free(&body);
}

void reply_err(uint32_t sid, int code, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n >= (int)sizeof(msg)) { /* cut: do not leave half a UTF-8 sequence */
		size_t len = sizeof(msg) - 1;
		while (len && (msg[len - 1] & 0xc0) == 0x80)
			len--;
		if (len && (msg[len - 1] & 0x80))
			len--;
		msg[len] = 0;
	}
	struct buf status = {0}, body = {0};
	pb_varint(&status, 1, (uint64_t)code);
	pb_str(&status, 2, msg);
	pb_bytes(&body, 1, BUF_DATA(&status), status.len);
	send_response(sid, &body);
	buf_free(&status);
	buf_free(&body);
}

static void handle_frame(uint32_t sid, uint8_t type, const uint8_t *p, size_t n)
{
	if (type != 1)
		return; /* ttrpc ignores frame types it does not know */
	if (!(sid & 1)) {
		reply_err(sid, C_INVALID, "StreamID must be odd for client initiated streams");
		return;
	}
	struct fields f;
	char err[128];
	if (pb_decode(p, n, "ssbU-", &f, err, sizeof(err))) {
		reply_err(sid, C_INVALID, "unmarshal request error: %s", err);
		fields_free(&f);
		return;
	}
	if (strcmp(FSTR(&f, 1), SERVICE)) {
		reply_err(sid, C_UNIMPL, "service %s: unknown service", FSTR(&f, 1));
	} else {
		int64_t timeout_ms = (int64_t)(f.v[4] / 1000000);
		if ((int64_t)f.v[4] > 0 && timeout_ms == 0)
			timeout_ms = 1;
		if ((int64_t)f.v[4] < 0)
			timeout_ms = 0;
		dispatch(sid, FSTR(&f, 2), f.b[3] ? f.b[3] : (const uint8_t *)"", f.blen[3],
			 timeout_ms);
	}
	fields_free(&f);
}

static void process_input(void)
{
	uint64_t gen = generation;
	size_t pos = 0;
	while (in.len - pos >= 10 && gen == generation) {
		const uint8_t *h = BUF_DATA(&in) + pos;
		uint32_t len = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
		uint32_t sid = (uint32_t)h[4] << 24 | (uint32_t)h[5] << 16 | (uint32_t)h[6] << 8 | h[7];
		if (len > MAX_FRAME || sid == 0) {
			logmsg(4, "bad frame header (length %u, stream %u)", len, sid);
			disconnect("bad frame header");
			return;
		}
		if (in.len - pos < 10 + (size_t)len)
			break;
		handle_frame(sid, h[8], h + 10, len);
		pos += 10 + (size_t)len;
	}
	if (gen == generation)
		buf_consume(&in, pos);
}

static void do_write(void)
{
	while (out.len) {
		ssize_t w = write(cfd, BUF_DATA(&out), out.len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			return;
		if (w <= 0) {
			disconnect(w < 0 ? strerror(errno) : "write returned 0");
			return;
		}
		buf_consume(&out, (size_t)w);
	}
}

static void do_read(void)
{
	for (int i = 0; i < 16 && out.len < OUT_HIGH; i++) {
		ssize_t r = read(cfd, buf_reserve(&in, 65536), 65536);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN)
			return;
		if (r <= 0) {
			disconnect(r < 0 ? strerror(errno) : "end of stream");
			return;
		}
		in.len += (size_t)r;
		process_input();
		if (cfd < 0 || hung)
			return;
	}
}

int chan_poll_add(struct pollfd *pfds, int n, int *timeout)
{
	idx = -1;
	if (is_port && hung) {
		struct pollfd p = {.fd = cfd, .events = POLLIN};
		if (poll(&p, 1, 0) == 1 && (p.revents & POLLHUP)) {
			if (*timeout < 0 || *timeout > 20)
				*timeout = 20; /* look again soon, without spinning */
			return n;
		}
		hung = 0;
		logmsg(6, "host connected");
	}
	if (cfd < 0) {
		if (lfd < 0)
			return n;
		pfds[n] = (struct pollfd){.fd = lfd, .events = POLLIN};
		idx = n;
		return n + 1;
	}
	short ev = out.len ? POLLOUT : 0;
	if (out.len < OUT_HIGH)
		ev |= POLLIN;
	pfds[n] = (struct pollfd){.fd = cfd, .events = ev};
	idx = n;
	return n + 1;
}

void chan_poll_handle(struct pollfd *pfds, int n)
{
	if (idx < 0 || idx >= n || !pfds[idx].revents)
		return;
	short re = pfds[idx].revents;
	if (cfd < 0) {
		cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (cfd >= 0)
			logmsg(6, "host connected");
		return;
	}
	if (re & POLLOUT)
		do_write();
	if (cfd >= 0 && !hung && (re & POLLIN))
		do_read();
	else if (cfd >= 0 && !hung && (re & (POLLHUP | POLLERR)))
		disconnect("hang-up");
	if (cfd >= 0 && !hung && out.len)
		do_write(); /* answers made while reading go out at once */
}

/* Push out what is queued (Shutdown answers before the power goes). */
void chan_flush(void)
{
	int64_t end = now_ms() + 1000;
	while (cfd >= 0 && !hung && out.len && now_ms() < end) {
		struct pollfd p = {.fd = cfd, .events = POLLOUT};
		poll(&p, 1, 100);
		do_write();
	}
}

/* Answers made outside the channel's own handling (pending calls) go out at once. */
void chan_write_now(void)
{
	if (cfd >= 0 && !hung && out.len)
		do_write();
}
