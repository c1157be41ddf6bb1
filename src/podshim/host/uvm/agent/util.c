/* Buffers, protobuf wire format, logging and small system helpers. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int g_pid1;
static int kmsg_fd = -1;

static void *xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);
	if (!q) {
		logmsg(3, "out of memory (%zu bytes)", n);
		abort();
	}
	return q;
}

uint8_t *buf_reserve(struct buf *b, size_t n)
{
	if (b->off && b->off + b->len + n > b->cap) {
		memmove(b->p, b->p + b->off, b->len);
		b->off = 0;
	}
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + n)
			cap *= 2;
		b->p = xrealloc(b->p, cap);
		b->cap = cap;
	}
	return b->p + b->off + b->len;
}

void buf_append(struct buf *b, const void *data, size_t n)
{
	if (!n)
		return;
	memcpy(buf_reserve(b, n), data, n);
	b->len += n;
}

void buf_consume(struct buf *b, size_t n)
{
	if (n >= b->len) {
		b->off = b->len = 0;
		if (b->cap > (256u << 10)) { /* give big buffers back once drained */
			free(b->p);
			b->p = NULL;
			b->cap = 0;
		}
		return;
	}
	b->off += n;
	b->len -= n;
}

void buf_free(struct buf *b)
{
	free(b->p);
	memset(b, 0, sizeof(*b));
}

void buf_printf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n <= 0)
		return;
	uint8_t *w = buf_reserve(b, (size_t)n + 1);
	va_start(ap, fmt);
	vsnprintf((char *)w, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

/* ---- protobuf ---- */

static int get_varint(const uint8_t **pp, const uint8_t *end, uint64_t *v)
{
	uint64_t r = 0;
	const uint8_t *p = *pp;
	for (int shift = 0; shift < 70; shift += 7) {
		if (p >= end)
			return -1;
		uint8_t c = *p++;
		if (shift == 63 && c > 1)
			return -1; /* over 64 bits */
		r |= (uint64_t)(c & 0x7f) << shift;
		if (!(c & 0x80)) {
			*pp = p;
			*v = r;
			return 0;
		}
	}
	return -1;
}

static int skip_group(const uint8_t **pp, const uint8_t *end, uint32_t num, int depth);

/* The next field of a message: 1, 0 at its end, -1 when malformed. Groups (wire types 3/4)
 * are skipped whole and reported with wt 3. */
int pb_next(const uint8_t **pp, const uint8_t *end, struct pbfield *f)
{
	uint64_t tag;
	if (*pp >= end)
		return 0;
	if (get_varint(pp, end, &tag) || (tag >> 3) == 0 || (tag >> 3) > 0x1fffffff)
		return -1;
	f->num = (uint32_t)(tag >> 3);
	f->wt = (int)(tag & 7);
	f->v = 0;
	f->p = NULL;
	f->len = 0;
	switch (f->wt) {
	case 0:
		return get_varint(pp, end, &f->v) ? -1 : 1;
	case 1:
	case 5: {
		size_t n = f->wt == 1 ? 8 : 4;
		if ((size_t)(end - *pp) < n)
			return -1;
		for (size_t i = 0; i < n; i++)
			f->v |= (uint64_t)(*pp)[i] << (8 * i);
		*pp += n;
		return 1;
	}
	case 2: {
		uint64_t n;
		if (get_varint(pp, end, &n) || n > (uint64_t)(end - *pp))
			return -1;
		f->p = *pp;
		f->len = (size_t)n;
		*pp += n;
		return 1;
	}
	case 3:
		return skip_group(pp, end, f->num, 0) ? -1 : 1;
	default: /* 4 (an end-group without its start), 6, 7 */
		return -1;
	}
}

static int skip_group(const uint8_t **pp, const uint8_t *end, uint32_t num, int depth)
{
	if (depth > 32)
		return -1;
	for (;;) {
		uint64_t tag;
		if (get_varint(pp, end, &tag))
			return -1;
		uint32_t fnum = (uint32_t)(tag >> 3);
		int wt = (int)(tag & 7);
		if (wt == 4)
			return fnum == num ? 0 : -1;
		if (wt == 3) {
			if (skip_group(pp, end, fnum, depth + 1))
				return -1;
			continue;
		}
		/* re-read this field with pb_next: step back over the tag is awkward, so decode
		 * the value here */
		uint64_t v;
		switch (wt) {
		case 0:
			if (get_varint(pp, end, &v))
				return -1;
			break;
		case 1:
		case 5:
			if ((size_t)(end - *pp) < (wt == 1 ? 8u : 4u))
				return -1;
			*pp += wt == 1 ? 8 : 4;
			break;
		case 2:
			if (get_varint(pp, end, &v) || v > (uint64_t)(end - *pp))
				return -1;
			*pp += v;
			break;
		default:
			return -1;
		}
	}
}

static void put_varint(struct buf *b, uint64_t v)
{
	uint8_t tmp[10];
	size_t n = 0;
	do {
		tmp[n++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
		v >>= 7;
	} while (v);
	buf_append(b, tmp, n);
}

void pb_varint(struct buf *b, uint32_t field, uint64_t v)
{
	if (!v)
		return; /* proto3: defaults are not written */
	put_varint(b, (uint64_t)field << 3);
	put_varint(b, v);
}

void pb_bytes(struct buf *b, uint32_t field, const void *data, size_t n)
{
	if (!n)
		return;
	put_varint(b, ((uint64_t)field << 3) | 2);
	put_varint(b, n);
	buf_append(b, data, n);
}

void pb_str(struct buf *b, uint32_t field, const char *s)
{
	pb_bytes(b, field, s, strlen(s));
}

static char *dup_str(const struct pbfield *f)
{
	char *s = xrealloc(NULL, f->len + 1);
	memcpy(s, f->p, f->len);
	s[f->len] = 0;
	return s;
}

int pb_decode(const uint8_t *p, size_t n, const char *kinds, struct fields *out,
	      char *err, size_t errlen)
{
	const uint8_t *end = p + n;
	struct pbfield f;
	int r;
	size_t nk = strlen(kinds);
	memset(out, 0, sizeof(*out));
	while ((r = pb_next(&p, end, &f)) > 0) {
		char k = f.num <= nk && f.num < NFIELDS ? kinds[f.num - 1] : '-';
		if (k == '-')
			continue;
		int want = (k == 's' || k == 'b' || k == 'R') ? 2 : 0;
		if (f.wt != want) {
			snprintf(err, errlen, "field %u: wire type %d, want %d", f.num, f.wt, want);
			return -1;
		}
		if ((k == 's' || k == 'R') && memchr(f.p, 0, f.len)) {
			snprintf(err, errlen, "field %u: string with a NUL byte", f.num);
			return -1;
		}
		switch (k) {
		case 's':
			free(out->s[f.num]);
			out->s[f.num] = dup_str(&f);
			break;
		case 'b':
			out->b[f.num] = f.p;
			out->blen[f.num] = f.len;
			break;
		case 'R':
			if (out->nlist[f.num] >= 4096) {
				snprintf(err, errlen, "field %u: too many strings", f.num);
				return -1;
			}
			out->list[f.num] = xrealloc(out->list[f.num],
						    (out->nlist[f.num] + 2) * sizeof(char *));
			out->list[f.num][out->nlist[f.num]++] = dup_str(&f);
			out->list[f.num][out->nlist[f.num]] = NULL;
			break;
		default:
			out->v[f.num] = f.v;
			break;
		}
	}
	if (r < 0) {
		snprintf(err, errlen, "malformed protobuf message");
		return -1;
	}
	return 0;
}

void fields_free(struct fields *f)
{
	for (int i = 0; i < NFIELDS; i++) {
		free(f->s[i]);
		for (size_t j = 0; j < f->nlist[i]; j++)
			free(f->list[i][j]);
		free(f->list[i]);
	}
	memset(f, 0, sizeof(*f));
}

/* ---- misc ---- */

void log_open_kmsg(void)
{
	kmsg_fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
}

/* level: kernel log level (3 error: shown on a quiet console, 6 info: dmesg only) */
void logmsg(int level, const char *fmt, ...)
{
	char line[512];
	int n = 0;
	if (kmsg_fd >= 0)
		n = snprintf(line, sizeof(line), "<%d>", level);
	n += snprintf(line + n, sizeof(line) - (size_t)n, "podshim-agent: ");
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	size_t len = strlen(line);
	line[len++] = '\n';
	if (kmsg_fd < 0 || write(kmsg_fd, line, len) < 0)
		(void)!write(2, line, len);
}

int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int errno_code(int err)
{
	switch (err) {
	case ENOENT:
	case ESRCH:
		return C_NOTFOUND;
	case EEXIST:
		return C_EXISTS;
	case EINVAL:
		return C_INVALID;
	default:
		return C_UNKNOWN;
	}
}

int set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* Read up to max bytes of a file (to EOF); -errno on failure. */
int read_file_into(const char *path, struct buf *out, size_t max)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0)
		return -errno;
	while (out->len < max) {
		size_t want = max - out->len < 65536 ? max - out->len : 65536;
		ssize_t r = read(fd, buf_reserve(out, want), want);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			int e = errno;
			close(fd);
			return -e;
		}
		if (r == 0)
			break;
		out->len += (size_t)r;
	}
	close(fd);
	return 0;
}

int write_all(int fd, const void *data, size_t n)
{
	const uint8_t *p = data;
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* mkdir -p */
int mkdirs(const char *path, mode_t mode)
{
	char tmp[4096];
	size_t n = strlen(path);
	if (n >= sizeof(tmp)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(tmp, path, n + 1);
	for (char *s = tmp + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = 0;
		if (mkdir(tmp, mode) && errno != EEXIST)
			return -1;
		*s = '/';
	}
	if (mkdir(tmp, mode) && errno != EEXIST)
		return -1;
	return 0;
}
