/* Keys (processes the host spawned), their stdio, console sockets, and reaping.
 *
 * Every child and orphan is reaped here (waitpid(-1) on SIGCHLD, through a signalfd). A
 * key's exit status stays until Release; a reaped pid that is no key's goes into a ring
 * of the ORPHANS newest, for WaitPid. stdout/stderr are read into per-key buffers of up
 * to STREAM_MAX bytes each (a full buffer stops the reading: back-pressure on the
 * process) that stay readable after the process exited.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

struct key *g_keys;
static int sigfd = -1;
static int sig_idx = -1;
static struct {
	pid_t pid;
	int status;
} orphans[ORPHANS];
static unsigned orphan_next;

void proc_init(void)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigprocmask(SIG_BLOCK, &set, NULL);
	sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	signal(SIGPIPE, SIG_IGN);
}

struct key *key_find(const char *name)
{
	for (struct key *k = g_keys; k; k = k->next)
		if (!strcmp(k->name, name))
			return k;
	return NULL;
}

struct key *key_by_pid(pid_t pid)
{
	for (struct key *k = g_keys; k; k = k->next)
		if (k->pid == pid)
			return k;
	return NULL;
}

void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}


void key_free(struct key *k)
{
	for (int i = 0; i < 2; i++) {
		close_fd(&k->st[i].fd);
		buf_free(&k->st[i].data);
	}
	close_fd(&k->in_fd);
	close_fd(&k->tty);
	buf_free(&k->inq);
	console_close(k);
	free(k->cpath);
	free(k->name);
	free(k);
}

int orphan_status(pid_t pid, int *status)
{
	for (unsigned i = 0; i < ORPHANS; i++)
		if (orphans[i].pid == pid) {
			*status = orphans[i].status;
			return 1;
		}
	return 0;
}

static void orphan_forget(pid_t pid)
{
	for (unsigned i = 0; i < ORPHANS; i++)
		if (orphans[i].pid == pid)
			orphans[i].pid = 0;
}

void orphans_describe(struct buf *out)
{
	for (unsigned i = 0; i < ORPHANS; i++) {
		unsigned j = (orphan_next + ORPHANS - 1 - i) % ORPHANS;
		if (orphans[j].pid)
			buf_printf(out, "reaped pid %d status %d\n", orphans[j].pid, orphans[j].status);
	}
}

static int exit_status(int st)
{
	return WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
}




static void reaped(pid_t pid, int st)
{
	struct key *k = key_by_pid(pid);
	if (k && !k->exited) {
		k->exited = 1;
		k->status = exit_status(st);
		if (k->csock >= 0 && k->st[0].fd < 0) {
			/* runc sent the master before it exited, or never will */
			console_accept(k);
			if (k->cconn >= 0)
				console_recv(k);
			if (k->st[0].fd < 0) {
				console_close(k);
				take_tty(k, -1);
			}
		}
		return;
	}
	orphans[orphan_next].pid = pid;
	orphans[orphan_next].status = exit_status(st);
	orphan_next = (orphan_next + 1) % ORPHANS;
}

static void reap(void)
{
	struct signalfd_siginfo si;
	while (read(sigfd, &si, sizeof(si)) > 0)
		;
	for (;;) {
		int st;
		pid_t pid = waitpid(-1, &st, WNOHANG);
		if (pid <= 0)
			break;
		reaped(pid, st);
	}
}

static void stream_fill(struct stream *s)
{
	while (s->fd >= 0 && s->data.len < STREAM_MAX) {
		size_t want = STREAM_MAX - s->data.len;
		if (want > 65536)
			want = 65536;
		ssize_t r = read(s->fd, buf_reserve(&s->data, want), want);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN)
			return;
		if (r <= 0) { /* EOF, or EIO: a pty whose other side is closed */
			close_fd(&s->fd);
			s->eof = 1;
			return;
		}
		s->data.len += (size_t)r;
	}
}

void stream_take(struct stream *s, uint32_t max, struct buf *out, int *eof)
{
	size_t n = s->data.len < max ? s->data.len : max;
	buf_append(out, BUF_DATA(&s->data), n);
	buf_consume(&s->data, n);
	*eof = s->eof && s->data.len == 0;
}

void stdin_pump(struct key *k)
{
	while (k->in_fd >= 0 && k->inq.len) {
		ssize_t w = write(k->in_fd, BUF_DATA(&k->inq), k->inq.len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			return;
		if (w <= 0) { /* EPIPE: nobody reads it any more */
			close_fd(&k->in_fd);
			buf_free(&k->inq);
			return;
		}
		buf_consume(&k->inq, (size_t)w);
	}
	if (k->in_close && !k->inq.len)
		close_fd(&k->in_fd);
}

/* pollfd slots: per key stdout, stderr, stdin, console listener, console connection */
int proc_poll_add(struct pollfd *pfds, int n)
{
	sig_idx = n;
	pfds[n++] = (struct pollfd){.fd = sigfd, .events = POLLIN};
	for (struct key *k = g_keys; k; k = k->next) {
		for (int i = 0; i < 2; i++)
			if (k->st[i].fd >= 0 && k->st[i].data.len < STREAM_MAX)
				pfds[n++] = (struct pollfd){.fd = k->st[i].fd, .events = POLLIN};
		if (k->in_fd >= 0 && k->inq.len)
			pfds[n++] = (struct pollfd){.fd = k->in_fd, .events = POLLOUT};
		if (k->cconn >= 0)
			pfds[n++] = (struct pollfd){.fd = k->cconn, .events = POLLIN};
		else if (k->csock >= 0)
			pfds[n++] = (struct pollfd){.fd = k->csock, .events = POLLIN};
	}
	return n;
}

static short revents_of(struct pollfd *pfds, int n, int fd)
{
	for (int i = 0; i < n; i++)
		if (pfds[i].fd == fd)
			return pfds[i].revents;
	return 0;
}

void proc_poll_handle(struct pollfd *pfds, int n)
{
	for (struct key *k = g_keys; k; k = k->next) {
		for (int i = 0; i < 2; i++)
			if (k->st[i].fd >= 0 && revents_of(pfds, n, k->st[i].fd))
				stream_fill(&k->st[i]);
		if (k->in_fd >= 0 && k->inq.len && revents_of(pfds, n, k->in_fd))
			stdin_pump(k);
		if (k->cconn >= 0 && revents_of(pfds, n, k->cconn))
			console_recv(k);
		else if (k->csock >= 0 && revents_of(pfds, n, k->csock))
			console_accept(k);
	}
	if (sig_idx >= 0 && sig_idx < n && pfds[sig_idx].revents)
		reap();
}

void proc_kill_all(void)
{
	for (struct key *k = g_keys; k; k = k->next)
		if (!k->exited)
			kill(k->pid, SIGKILL);
}

/* ---- Spawn ---- */

static char *lookup(const char *arg0)
{
	static const char *const dirs[] = {"/usr/sbin", "/usr/bin", "/sbin", "/bin"};
	if (strchr(arg0, '/'))
		return strdup(arg0);
	for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
		char *p;
		if (asprintf(&p, "%s/%s", dirs[i], arg0) < 0)
			return NULL;
		if (!access(p, X_OK))
			return p;
		free(p);
	}
	return NULL;
}

struct child_io {
	int in[2], out[2], err[2];
	int pty;
	char pts[128];
};


static void exec_child(const char *path, char **args, char **env, const char *cwd,
		       struct child_io *io, int errw, int terminal)
{
	sigset_t all;
	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
	signal(SIGPIPE, SIG_DFL);
	setsid();
	int stage = 0;
	int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (terminal) {
		int s = open(io->pts, O_RDWR);
		if (s < 0 || ioctl(s, TIOCSCTTY, 0) < 0)
			goto fail;
		dup2(s, 0);
		dup2(s, 1);
		dup2(s, 2);
		if (s > 2)
			close(s);
	} else {
		dup2(io->in[0] >= 0 ? io->in[0] : devnull, 0);
		dup2(io->out[1] >= 0 ? io->out[1] : devnull, 1);
		dup2(io->err[1] >= 0 ? io->err[1] : devnull, 2);
	}
	stage = 1;
	if (chdir(cwd && *cwd ? cwd : "/"))
		goto fail;
	stage = 2;
	execve(path, args, env);
fail:;
	int msg[2] = {stage, errno};
	(void)!write(errw, msg, sizeof(msg));
	_exit(127);
}

static void pipe_close(int p[2])
{
	close_fd(&p[0]);
	close_fd(&p[1]);
}

/* fields: 1 key, 2 args, 3 env, 4 cwd, 5 stdin, 6 stdout, 7 stderr, 8 terminal,
 * 9 console_socket, 10 width, 11 height */
void rpc_spawn(uint32_t sid, struct fields *f)
{
	const char *name = FSTR(f, 1);
	if (!*name || !f->nlist[2]) {
		reply_err(sid, C_INVALID, "spawn: a key and args are required");
		return;
	}
	if (key_find(name)) {
		reply_err(sid, C_EXISTS, "spawn: key %s already exists", name);
		return;
	}
	int terminal = f->v[8] != 0, csock = f->v[9] != 0;
	if (terminal && csock) {
		reply_err(sid, C_INVALID, "spawn %s: terminal and console_socket both set", name);
		return;
	}
	char **args = f->list[2];
	char *path = lookup(args[0]);
	if (!path) {
		reply_err(sid, C_NOTFOUND, "spawn %s: %s: executable file not found in $PATH", name,
			  args[0]);
		return;
	}
	struct key *k = calloc(1, sizeof(*k));
	k->name = strdup(name);
	k->st[0].fd = k->st[1].fd = k->in_fd = k->tty = k->csock = k->cconn = -1;
	k->width = (uint16_t)f->v[10];
	k->height = (uint16_t)f->v[11];
	struct child_io io = {{-1, -1}, {-1, -1}, {-1, -1}, -1, ""};
	int errp[2] = {-1, -1};
	const char *what = "pipe";
	int ok = 1;
	if (terminal) {
		what = "pty";
		io.pty = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		ok = io.pty >= 0 && !grantpt(io.pty) && !unlockpt(io.pty) &&
		     !ptsname_r(io.pty, io.pts, sizeof(io.pts));
		if (ok && (k->width || k->height)) {
			struct winsize ws = {.ws_row = k->height, .ws_col = k->width};
			ioctl(io.pty, TIOCSWINSZ, &ws);
		}
	} else if (csock) {
		what = "console socket";
		ok = !console_listen(k);
		if (ok)
			for (size_t i = 0; i < f->nlist[2]; i++)
				if (!strcmp(args[i], "{console-socket}")) {
					free(args[i]);
					args[i] = strdup(k->cpath);
				}
		if (f->v[7] && pipe2(io.err, O_CLOEXEC))
			ok = 0;
	} else {
		ok = !(f->v[5] && pipe2(io.in, O_CLOEXEC)) && !(f->v[6] && pipe2(io.out, O_CLOEXEC)) &&
		     !(f->v[7] && pipe2(io.err, O_CLOEXEC));
	}
	if (ok) {
		what = "pipe";
		ok = !pipe2(errp, O_CLOEXEC);
	}
	char *path_env[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", NULL};
	pid_t pid = -1;
	if (ok) {
		what = "fork";
		pid = fork();
		ok = pid >= 0;
	}
	if (pid == 0)
		exec_child(path, args, f->nlist[3] ? f->list[3] : path_env, f->s[4], &io, errp[1],
			   terminal);
	int err = errno;
	close_fd(&errp[1]);
	close_fd(&io.in[0]);
	close_fd(&io.out[1]);
	close_fd(&io.err[1]);
	int msg[2] = {0, 0};
	if (ok) {
		ssize_t r;
		do
			r = read(errp[0], msg, sizeof(msg));
		while (r < 0 && errno == EINTR);
		if (r == (ssize_t)sizeof(msg)) {
			int st;
			waitpid(pid, &st, 0);
			ok = 0;
			err = msg[1];
			what = msg[0] == 0 ? "stdio" : msg[0] == 1 ? "chdir" : "exec";
		}
	}
	close_fd(&errp[0]);
	if (!ok) {
		const char *arg = msg[0] == 1 ? FSTR(f, 4) : path;
		reply_err(sid, errno_code(err) == C_NOTFOUND ? C_NOTFOUND : C_UNKNOWN,
			  "spawn %s: %s %s: %s", name, what, arg, strerror(err));
		pipe_close(io.in);
		pipe_close(io.out);
		pipe_close(io.err);
		close_fd(&io.pty);
		key_free(k);
		free(path);
		return;
	}
	free(path);
	k->pid = pid;
	orphan_forget(pid);
	if (terminal) {
		k->st[0].fd = io.pty;
		k->st[1].eof = 1;
		k->in_fd = fcntl(io.pty, F_DUPFD_CLOEXEC, 3);
		k->tty = fcntl(io.pty, F_DUPFD_CLOEXEC, 3);
		set_nonblock(io.pty);
	} else {
		k->in_fd = io.in[1];
		k->st[0].fd = io.out[0];
		k->st[1].fd = io.err[0];
		for (int i = 0; i < 2; i++)
			k->st[i].eof = k->st[i].fd < 0 && !(i == 0 && csock);
		if (k->in_fd >= 0)
			set_nonblock(k->in_fd);
		for (int i = 0; i < 2; i++)
			if (k->st[i].fd >= 0)
				set_nonblock(k->st[i].fd);
	}
	k->next = g_keys;
	g_keys = k;
	struct buf resp = {0};
	pb_varint(&resp, 1, (uint64_t)(uint32_t)pid);
	reply_ok(sid, &resp);
	buf_free(&resp);
}
