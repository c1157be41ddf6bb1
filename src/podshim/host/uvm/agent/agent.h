/* podshim's guest agent: shared declarations.
 *
 * The agent serves podshim.agent.v1.Agent (proto/podshim/api/agent/v1/agent.proto) over
 * ttrpc on one byte channel: the virtio-serial port "podshim.agent" when it is the guest's
 * PID 1, or a unix socket (`agent --listen PATH`) when it runs on a host for tests.
 * One thread, one poll loop; calls that block (Wait, WaitPid, ReadStream, WatchFile) are
 * kept as pending calls and answered when they can be.
 */
#ifndef PODSHIM_AGENT_H
#define PODSHIM_AGENT_H

#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <poll.h>
#include <sys/types.h>

#ifndef AGENT_VERSION
#define AGENT_VERSION "dev"
#endif

#define MAX_FRAME (4u << 20)          /* ttrpc's message limit */
#define STREAM_MAX (1u << 20)         /* buffered stdout/stderr per key */
#define STDIN_MAX (1u << 20)          /* queued stdin per key */
#define READ_DEFAULT (64u << 10)
#define FILE_DEFAULT (1u << 20)
#define REPLY_MAX (MAX_FRAME - 4096)  /* the largest payload an answer carries */
#define OUT_HIGH (16u << 20)          /* stop reading requests past this much output */
#define ORPHANS 1024                  /* reaped pids kept for WaitPid */
#define NFIELDS 16

/* google.rpc codes */
enum {
	C_OK = 0, C_UNKNOWN = 2, C_INVALID = 3, C_DEADLINE = 4, C_NOTFOUND = 5,
	C_EXISTS = 6, C_EXHAUSTED = 8, C_PRECOND = 9, C_UNIMPL = 12, C_INTERNAL = 13,
};

/* util.c: growable byte buffers (data = p + off, len bytes) */
struct buf {
	uint8_t *p;
	size_t off, len, cap;
};
uint8_t *buf_reserve(struct buf *b, size_t n);
void buf_append(struct buf *b, const void *data, size_t n);
void buf_consume(struct buf *b, size_t n);
void buf_free(struct buf *b);
void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define BUF_DATA(b) ((b)->p + (b)->off)

/* util.c: protobuf */
struct pbfield {
	uint32_t num;
	int wt;
	uint64_t v;
	const uint8_t *p;
	size_t len;
};
int pb_next(const uint8_t **pp, const uint8_t *end, struct pbfield *f);
void pb_varint(struct buf *b, uint32_t field, uint64_t v);
void pb_bytes(struct buf *b, uint32_t field, const void *data, size_t n);
void pb_str(struct buf *b, uint32_t field, const char *s);

/* a decoded request message: slot i = field number i. kinds[i-1] says its type:
 * 's' string, 'b' bytes, 'u' uint32, 'i' int32, 'U' uint64, 'B' bool, 'R' repeated
 * string, '-' none (skipped like an unknown field) */
struct fields {
	char *s[NFIELDS];
	const uint8_t *b[NFIELDS];
	size_t blen[NFIELDS];
	uint64_t v[NFIELDS];
	char **list[NFIELDS];
	size_t nlist[NFIELDS];
};
int pb_decode(const uint8_t *p, size_t n, const char *kinds, struct fields *out,
	      char *err, size_t errlen);
void fields_free(struct fields *f);
#define FSTR(f, i) ((f)->s[i] ? (f)->s[i] : "")

/* util.c: misc */
extern int g_pid1;
void logmsg(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void log_open_kmsg(void);
int64_t now_ms(void);
int errno_code(int err);
int set_nonblock(int fd);
int read_file_into(const char *path, struct buf *out, size_t max);
int write_all(int fd, const void *data, size_t n);
int mkdirs(const char *path, mode_t mode);

/* chan.c: the channel, framing and answers */
void reply_ok(uint32_t sid, const struct buf *payload);
void reply_err(uint32_t sid, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void chan_listen(const char *path);
void chan_port(int fd);
int chan_poll_add(struct pollfd *pfds, int n, int *timeout);
void chan_poll_handle(struct pollfd *pfds, int n);
void chan_flush(void);
void chan_write_now(void);
uint64_t chan_generation(void);

struct stream;
/* pending calls */
enum { P_WAIT = 1, P_WAITPID, P_READ, P_WATCH };
struct pending {
	struct pending *next;
	uint32_t sid;
	int kind;
	char *key;
	int pid;
	int stream;
	uint32_t max;
	int wd;
	int64_t deadline; /* ms, 0 = none */
};
extern struct pending *g_pending;
void pending_add(struct pending *p);
void pending_run(void);
void pending_drop_all(void);
int pending_timeout(int timeout);
void pending_free(struct pending *p);
void pending_done(struct pending *p);
int pending_try(struct pending *p, int64_t now);
struct pending *pend(uint32_t sid, int kind, const char *key, int64_t timeout_ms);
void reply_status(uint32_t sid, int status);
void reply_read(uint32_t sid, struct stream *s, uint32_t max);
extern int g_inotify_fd;

/* proc.c: keys, children, stdio, reaping */
struct stream {
	int fd;
	int eof;
	struct buf data;
};
struct key {
	struct key *next;
	char *name;
	pid_t pid;
	int exited, status;
	struct stream st[2];
	int in_fd, in_close;
	struct buf inq;
	int tty;             /* pty master for Resize, -1 */
	int csock, cconn;    /* console socket listener and its accepted connection */
	char *cpath;
	uint16_t width, height;
};
extern struct key *g_keys;
struct key *key_find(const char *name);
struct key *key_by_pid(pid_t pid);
void key_free(struct key *k);
int orphan_status(pid_t pid, int *status);
void orphans_describe(struct buf *out);
void rpc_spawn(uint32_t sid, struct fields *f);
void proc_init(void);
int proc_poll_add(struct pollfd *pfds, int n);
void proc_poll_handle(struct pollfd *pfds, int n);
void proc_kill_all(void);
void stream_take(struct stream *s, uint32_t max, struct buf *out, int *eof);
void stdin_pump(struct key *k);
void close_fd(int *fd);

/* console.c */
void console_close(struct key *k);
void take_tty(struct key *k, int fd);
int console_recv(struct key *k);
void console_accept(struct key *k);
int console_listen(struct key *k);

/* rpc.c */
void dispatch(uint32_t sid, const char *method, const uint8_t *p, size_t n, int64_t timeout_ms);
int rpc_poll_add(struct pollfd *pfds, int n);
void rpc_poll_handle(struct pollfd *pfds, int n);
void pending_check_watch(struct pending *p);
extern int g_shutdown;

/* stacks.c */
void rpc_stacks(uint32_t sid);

/* boot.c */
/* the boot steps of PID 1; -1: the guest cannot be what the pod needs (logged) */
int boot(void);
/* waits for what boot() left to a thread (the 9p mounts); then a no-op */
void boot_settle(void);
int open_port(void);

#endif
