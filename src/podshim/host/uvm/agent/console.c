/* Console sockets (runc --console-socket): the agent listens on a fresh unix socket,
 * and the pty master runc sends over it (SCM_RIGHTS) becomes the key's terminal. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

static unsigned console_seq;

void console_close(struct key *k)
{
	close_fd(&k->cconn);
	if (k->csock >= 0) {
		close_fd(&k->csock);
		unlink(k->cpath);
	}
}

/* The pty master came in on the console socket (or it never will: fd < 0). */
void take_tty(struct key *k, int fd)
{
	if (fd < 0) {
		k->st[0].eof = 1;
		return;
	}
	set_nonblock(fd);
	fcntl(fd, F_SETFD, FD_CLOEXEC);
	if (k->width || k->height) {
		struct winsize ws = {.ws_row = k->height, .ws_col = k->width};
		ioctl(fd, TIOCSWINSZ, &ws);
	}
	k->st[0].fd = fd;
	k->in_fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	k->tty = fcntl(fd, F_DUPFD_CLOEXEC, 3);
}

/* Read a console-socket message; 1 when done with the connection. */
int console_recv(struct key *k)
{
	char data[1024];
	char ctl[CMSG_SPACE(sizeof(int) * 4)];
	struct iovec iov = {.iov_base = data, .iov_len = sizeof(data)};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
			    .msg_controllen = sizeof(ctl)};
	ssize_t r = recvmsg(k->cconn, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	int got = -1;
	for (struct cmsghdr *c = r > 0 ? CMSG_FIRSTHDR(&mh) : NULL; c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		int nfd = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
		int *fds = (int *)CMSG_DATA(c);
		for (int i = 0; i < nfd; i++) {
			if (got < 0)
				got = fds[i];
			else
				close(fds[i]);
		}
	}
	close_fd(&k->cconn);
	if (got >= 0) {
		console_close(k);
		take_tty(k, got);
	}
	return 1;
}

void console_accept(struct key *k)
{
	if (k->cconn >= 0 || k->csock < 0)
		return;
	k->cconn = accept4(k->csock, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
}

int console_listen(struct key *k)
{
	const char *dir = g_pid1 ? "/run" : getenv("TMPDIR");
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int n = snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/podshim-console-%d-%u.sock",
			 dir && *dir ? dir : "/tmp", getpid(), ++console_seq);
	if (n >= (int)sizeof(sa.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	k->csock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	unlink(sa.sun_path);
	if (k->csock < 0 || bind(k->csock, (struct sockaddr *)&sa, sizeof(sa)) ||
	    listen(k->csock, 4))
		return -1;
	k->cpath = strdup(sa.sun_path);
	return 0;
}
