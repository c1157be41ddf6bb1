/* The Agent service's methods (the waiting ones park in pending.c). */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/utsname.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

int g_shutdown;
static int ifd_idx = -1;
#define ifd g_inotify_fd

/* ---- inotify ---- */

int rpc_poll_add(struct pollfd *pfds, int n)
{
	ifd_idx = -1;
	if (ifd < 0)
		return n;
	ifd_idx = n;
	pfds[n] = (struct pollfd){.fd = ifd, .events = POLLIN};
	return n + 1;
}

void rpc_poll_handle(struct pollfd *pfds, int n)
{
	if (ifd_idx < 0 || ifd_idx >= n || !pfds[ifd_idx].revents)
		return;
	char evbuf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
	ssize_t r;
	while ((r = read(ifd, evbuf, sizeof(evbuf))) > 0) {
		for (char *q = evbuf; q < evbuf + r;) {
			struct inotify_event *ev = (struct inotify_event *)q;
			q += sizeof(*ev) + ev->len;
			struct pending *p = g_pending;
			while (p) {
				struct pending *next = p->next;
				if (p->kind == P_WATCH && p->wd == ev->wd) {
					if (ev->mask & IN_IGNORED) {
						reply_err(p->sid, C_NOTFOUND, "watched file is gone");
						p->wd = -1;
					} else {
						struct buf b = {0};
						pb_varint(&b, 1, 1);
						reply_ok(p->sid, &b);
						buf_free(&b);
					}
					pending_done(p);
				}
				p = next;
			}
		}
	}
}

/* ---- methods ---- */

static void rpc_ping(uint32_t sid)
{
	struct utsname u;
	struct timespec ts;
	struct buf b = {0};
	uname(&u);
	clock_gettime(CLOCK_BOOTTIME, &ts);
	pb_str(&b, 1, AGENT_VERSION);
	pb_str(&b, 2, u.release);
	pb_varint(&b, 3, (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000);
	reply_ok(sid, &b);
	buf_free(&b);
}

static struct key *need_key(uint32_t sid, const char *name)
{
	struct key *k = key_find(name);
	if (!k)
		reply_err(sid, C_NOTFOUND, "key %s: not found", name);
	return k;
}

static void rpc_wait(uint32_t sid, struct fields *f, int64_t timeout_ms)
{
	struct key *k = need_key(sid, FSTR(f, 1));
	if (!k)
		return;
	if (k->exited)
		reply_status(sid, k->status);
	else
		pending_add(pend(sid, P_WAIT, k->name, timeout_ms));
}

static void rpc_waitpid(uint32_t sid, struct fields *f, int64_t timeout_ms)
{
	int pid = (int)(int32_t)f->v[1], status;
	struct key *k = pid > 0 ? key_by_pid(pid) : NULL;
	if (pid <= 0)
		reply_err(sid, C_INVALID, "wait_pid: bad pid %d", pid);
	else if (k && k->exited)
		reply_status(sid, k->status);
	else if (!k && orphan_status(pid, &status))
		reply_status(sid, status);
	else if (!k && kill(pid, 0) && errno == ESRCH)
		reply_err(sid, C_NOTFOUND, "pid %d: no such process", pid);
	else {
		struct pending *p = pend(sid, P_WAITPID, NULL, timeout_ms);
		p->pid = pid;
		pending_add(p);
	}
}

static void rpc_signal(uint32_t sid, struct fields *f)
{
	int pid = (int)(int32_t)f->v[2], sig = (int)(int32_t)f->v[3];
	const char *name = FSTR(f, 1);
	if (sig < 0 || sig > 64) {
		reply_err(sid, C_INVALID, "signal %d: out of range", sig);
		return;
	}
	if (*name) {
		struct key *k = need_key(sid, name);
		if (!k)
			return;
		if (k->exited) {
			reply_err(sid, C_NOTFOUND, "key %s: process has exited", name);
			return;
		}
		pid = k->pid;
	} else if (pid <= 0) {
		reply_err(sid, C_INVALID, "signal: a key or a pid is required");
		return;
	}
	if (kill(pid, sig))
		reply_err(sid, errno_code(errno), "signal pid %d: %s", pid, strerror(errno));
	else
		reply_ok(sid, NULL);
}

static void rpc_read(uint32_t sid, struct fields *f, int64_t timeout_ms)
{
	int stream = (int)f->v[2];
	uint32_t max = (uint32_t)f->v[3];
	if (stream != 1 && stream != 2) {
		reply_err(sid, C_INVALID, "read: stream %d (1 = stdout, 2 = stderr)", stream);
		return;
	}
	struct key *k = need_key(sid, FSTR(f, 1));
	if (!k)
		return;
	struct pending *p = pend(sid, P_READ, k->name, timeout_ms);
	p->stream = stream;
	p->max = !max ? READ_DEFAULT : max > REPLY_MAX - 64 ? REPLY_MAX - 64 : max;
	pending_add(p);
	if (pending_try(p, now_ms()))
		pending_done(p);
}

static void rpc_write_stdin(uint32_t sid, struct fields *f)
{
	struct key *k = need_key(sid, FSTR(f, 1));
	if (!k)
		return;
	if (k->in_fd < 0 || k->in_close) {
		reply_err(sid, C_PRECOND, "key %s: stdin is closed", k->name);
		return;
	}
	size_t room = STDIN_MAX > k->inq.len ? STDIN_MAX - k->inq.len : 0;
	size_t n = f->blen[2] < room ? f->blen[2] : room;
	if (!n && f->blen[2]) {
		reply_err(sid, C_EXHAUSTED, "key %s: %zu bytes of stdin already queued", k->name,
			  k->inq.len);
		return;
	}
	buf_append(&k->inq, f->b[2], n);
	stdin_pump(k);
	struct buf b = {0};
	pb_varint(&b, 1, n);
	reply_ok(sid, &b);
	buf_free(&b);
}

static void rpc_close_stdin(uint32_t sid, struct fields *f)
{
	struct key *k = need_key(sid, FSTR(f, 1));
	if (!k)
		return;
	k->in_close = 1;
	stdin_pump(k);
	reply_ok(sid, NULL);
}

static void rpc_resize(uint32_t sid, struct fields *f)
{
	struct key *k = need_key(sid, FSTR(f, 1));
	if (!k)
		return;
	struct winsize ws = {.ws_col = (uint16_t)f->v[2], .ws_row = (uint16_t)f->v[3]};
	k->width = ws.ws_col;
	k->height = ws.ws_row;
	if (k->tty < 0) {
		if (k->csock >= 0) /* the pty has not come yet: it gets this size */
			reply_ok(sid, NULL);
		else
			reply_err(sid, C_PRECOND, "key %s has no terminal", k->name);
		return;
	}
	if (ioctl(k->tty, TIOCSWINSZ, &ws))
		reply_err(sid, C_UNKNOWN, "resize %s: %s", k->name, strerror(errno));
	else
		reply_ok(sid, NULL);
}

static void rpc_release(uint32_t sid, struct fields *f)
{
	struct key *k = need_key(sid, FSTR(f, 1));
	if (!k)
		return;
	if (!k->exited) {
		reply_err(sid, C_PRECOND, "key %s: process %d is still running", k->name, k->pid);
		return;
	}
	for (struct key **pp = &g_keys; *pp; pp = &(*pp)->next)
		if (*pp == k) {
			*pp = k->next;
			break;
		}
	key_free(k);
	reply_ok(sid, NULL);
	pending_run();
}

static void rpc_read_file(uint32_t sid, struct fields *f)
{
	uint32_t max = (uint32_t)f->v[2];
	struct buf data = {0}, b = {0};
	max = !max ? FILE_DEFAULT : max > REPLY_MAX - 64 ? REPLY_MAX - 64 : max;
	int r = read_file_into(FSTR(f, 1), &data, max);
	if (r < 0) {
		reply_err(sid, errno_code(-r), "read %s: %s", FSTR(f, 1), strerror(-r));
	} else {
		pb_bytes(&b, 1, BUF_DATA(&data), data.len);
		reply_ok(sid, &b);
	}
	buf_free(&data);
	buf_free(&b);
}

static void rpc_write_file(uint32_t sid, struct fields *f)
{
	const char *path = FSTR(f, 1);
	if (f->v[3]) {
		char *copy = strdup(path);
		int r = mkdirs(dirname(copy), 0755);
		free(copy);
		if (r) {
			reply_err(sid, errno_code(errno), "mkdir for %s: %s", path, strerror(errno));
			return;
		}
	}
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOCTTY, 0644);
	if (fd < 0 || write_all(fd, f->b[2] ? f->b[2] : (const uint8_t *)"", f->blen[2])) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		reply_err(sid, errno_code(e), "write %s: %s", path, strerror(e));
		return;
	}
	if (close(fd))
		reply_err(sid, errno_code(errno), "write %s: %s", path, strerror(errno));
	else
		reply_ok(sid, NULL);
}

static void rpc_watch_file(uint32_t sid, struct fields *f)
{
	if (ifd < 0)
		ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	int wd = ifd < 0 ? -1 : inotify_add_watch(ifd, FSTR(f, 1), IN_MODIFY);
	if (wd < 0) {
		reply_err(sid, errno_code(errno), "watch %s: %s", FSTR(f, 1), strerror(errno));
		return;
	}
	struct pending *p = pend(sid, P_WATCH, NULL, (int64_t)(uint32_t)f->v[2]);
	p->wd = wd;
	pending_add(p);
}

/* The mount point dst for src: a directory, or an empty file when src is not one. */
static int make_target(const char *dst, int dir)
{
	if (dir)
		return mkdirs(dst, 0755);
	char *copy = strdup(dst);
	int r = copy ? mkdirs(dirname(copy), 0755) : -1;
	free(copy);
	int fd = r ? -1 : open(dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
	return fd < 0 ? -1 : close(fd);
}

#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif
#ifndef MOUNT_ATTR_RDONLY
#define MOUNT_ATTR_RDONLY 0x00000001
#endif
struct attr { uint64_t set, clr, propagation, userns; };

/* A bind of src (taken here, in PID 1's mount namespace, as a detached tree: open_tree)
 * attached at dst inside the mount namespace and root of process pid (a container's
 * init) by a child that joins them: setns to a mount namespace needs a caller that
 * shares no file-system state, so not PID 1 itself. */
static void mount_into(uint32_t sid, int pid, const char *src, const char *dst, int mk,
		       int ro)
{
	char path[64], why[256] = "";
	struct stat st;
	int dir = stat(src, &st) || S_ISDIR(st.st_mode);
	snprintf(path, sizeof(path), "/proc/%d/ns/mnt", pid);
	int ns = open(path, O_RDONLY | O_CLOEXEC);
	snprintf(path, sizeof(path), "/proc/%d/root", pid);
	int root = ns < 0 ? -1 : open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int tree = root < 0 ? -1
			    : (int)syscall(SYS_open_tree, AT_FDCWD, src,
					   OPEN_TREE_CLONE | O_CLOEXEC | AT_RECURSIVE);
	struct attr a = {MOUNT_ATTR_RDONLY, 0, 0, 0};
	int p[2] = {-1, -1};
	if (tree < 0 || (ro && syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH | AT_RECURSIVE,
				      &a, sizeof(a))) || pipe2(p, O_CLOEXEC)) {
		int e = errno;
		reply_err(sid, errno_code(e), "mount %s into process %d: %s", src, pid, strerror(e));
		goto out;
	}
	pid_t child = fork();
	if (child == 0) {
		const char *step = "join its mount namespace";
		int bad = setns(ns, CLONE_NEWNS);
		if (!bad && (step = "enter its root", fchdir(root) || chroot(".")))
			bad = 1;
		if (!bad && mk && (step = "create the target", make_target(dst, dir)))
			bad = 1;
		if (!bad && (step = "attach",
			     syscall(SYS_move_mount, tree, "", AT_FDCWD, dst, MOVE_MOUNT_F_EMPTY_PATH)))
			bad = 1;
		if (bad)
			dprintf(p[1], "%s: %s", step, strerror(errno));
		_exit(bad);
	}
	close(p[1]);
	p[1] = -1;
	int status = 0;
	while (child > 0 && waitpid(child, &status, 0) < 0 && errno == EINTR)
		;
	ssize_t n = read(p[0], why, sizeof(why) - 1);
	why[n > 0 ? n : 0] = 0;
	if (child < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
		reply_err(sid, C_UNKNOWN, "mount %s at %s in process %d: %s", src, dst, pid,
			  why[0] ? why : "the helper failed");
	else
		reply_ok(sid, NULL);
out:
	for (int i = 0; i < 2; i++)
		if (p[i] >= 0)
			close(p[i]);
	if (tree >= 0)
		close(tree);
	if (root >= 0)
		close(root);
	if (ns >= 0)
		close(ns);
}

static void rpc_mount(uint32_t sid, struct fields *f)
{
	const char *src = FSTR(f, 1), *dst = FSTR(f, 2), *type = FSTR(f, 3);
	if (f->v[7]) {
		mount_into(sid, (int)f->v[7], src, dst, (int)f->v[6],
			   ((unsigned long)f->v[4] & MS_RDONLY) != 0);
		return;
	}
	if (f->v[6]) {
		struct stat st;
		if (make_target(dst, !*src || stat(src, &st) || S_ISDIR(st.st_mode))) {
			reply_err(sid, errno_code(errno), "mount: create %s: %s", dst, strerror(errno));
			return;
		}
	}
	if (mount(src, dst, *type ? type : NULL, (unsigned long)f->v[4], f->s[5]))
		reply_err(sid, errno_code(errno), "mount %s on %s: %s", src, dst, strerror(errno));
	else
		reply_ok(sid, NULL);
}

static const struct method {
	const char *name;
	const char *kinds;
} methods[] = {
	{"Ping", ""}, {"Spawn", "sRRsBBBBBuu"}, {"Wait", "s"}, {"WaitPid", "i"},
	{"Signal", "sii"}, {"ReadStream", "suu"}, {"WriteStdin", "sb"}, {"CloseStdin", "s"},
	{"Resize", "suu"}, {"Release", "s"}, {"ReadFile", "su"}, {"WriteFile", "sbB"},
	{"WatchFile", "su"}, {"Mount", "sssUsBi"}, {"Stacks", ""}, {"Shutdown", ""},
};

void dispatch(uint32_t sid, const char *method, const uint8_t *p, size_t n, int64_t timeout_ms)
{
	size_t i, nm = sizeof(methods) / sizeof(methods[0]);
	for (i = 0; i < nm && strcmp(methods[i].name, method); i++)
		;
	if (i == nm) {
		reply_err(sid, C_UNIMPL, "method %s: not implemented", method);
		return;
	}
	struct fields f;
	char err[128];
	if (pb_decode(p, n, methods[i].kinds, &f, err, sizeof(err))) {
		reply_err(sid, C_INVALID, "%s: bad request: %s", method, err);
		fields_free(&f);
		return;
	}
	if (i != 0)
		boot_settle();
	switch (i) {
	case 0: rpc_ping(sid); break;
	case 1: rpc_spawn(sid, &f); break;
	case 2: rpc_wait(sid, &f, timeout_ms); break;
	case 3: rpc_waitpid(sid, &f, timeout_ms); break;
	case 4: rpc_signal(sid, &f); break;
	case 5: rpc_read(sid, &f, timeout_ms); break;
	case 6: rpc_write_stdin(sid, &f); break;
	case 7: rpc_close_stdin(sid, &f); break;
	case 8: rpc_resize(sid, &f); break;
	case 9: rpc_release(sid, &f); break;
	case 10: rpc_read_file(sid, &f); break;
	case 11: rpc_write_file(sid, &f); break;
	case 12: rpc_watch_file(sid, &f); break;
	case 13: rpc_mount(sid, &f); break;
	case 14: rpc_stacks(sid); break;
	case 15: reply_ok(sid, NULL); g_shutdown = 1; break;
	}
	fields_free(&f);
}
