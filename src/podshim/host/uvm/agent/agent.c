/* podshim's guest agent: main and the event loop.
 *
 *   agent                      as the guest's PID 1: boot steps, then serve the
 *                              virtio-serial port "podshim.agent"
 *   agent --listen PATH        anywhere else (tests): serve a unix socket at PATH, one
 *                              connection at a time, as a child subreaper
 *
 * Files: agent.h (declarations), util.c (buffers, protobuf, helpers), chan.c (channel and
 * ttrpc framing), rpc.c (methods), pending.c (calls waiting for an event), proc.c (keys,
 * spawn, stdio, reaping), console.c (console sockets), stacks.c, boot.c (PID 1 set-up).
 */
#include "agent.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <unistd.h>

static void power_off(void)
{
	chan_flush();
	if (g_pid1) {
		kill(-1, SIGKILL);
		sync();
		reboot(RB_AUTOBOOT);
		for (;;)
			pause();
	}
	proc_kill_all(); /* never kill(-1) on a host */
	exit(0);
}

static struct pollfd *pfds;
static size_t npfds;

static int nslots(void)
{
	int n = 8;
	for (struct key *k = g_keys; k; k = k->next)
		n += 4;
	return n;
}

int main(int argc, char **argv)
{
	const char *listen_path = NULL;
	g_pid1 = getpid() == 1;
	if (argc == 3 && !strcmp(argv[1], "--listen")) {
		listen_path = argv[2];
	} else if (argc != 1 || !g_pid1) {
		fprintf(stderr, "usage: %s --listen SOCKET (or run as PID 1)\n", argv[0]);
		return 2;
	}
	proc_init();
	if (listen_path) {
		g_pid1 = 0;
		prctl(PR_SET_CHILD_SUBREAPER, 1);
		chan_listen(listen_path);
	} else {
		if (boot()) {
			logmsg(2, "boot failed: powering off");
			power_off();
		}
		int fd = open_port();
		if (fd < 0) {
			logmsg(3, "no virtio-serial port named podshim.agent: powering off");
			power_off();
		}
		chan_port(fd);
	}
	logmsg(6, "serving (%s)", AGENT_VERSION);
	for (;;) {
		size_t need = (size_t)nslots();
		if (need > npfds) {
			npfds = need * 2;
			pfds = realloc(pfds, npfds * sizeof(*pfds));
			if (!pfds)
				abort();
		}
		int timeout = pending_timeout(-1);
		int n = chan_poll_add(pfds, 0, &timeout);
		n = proc_poll_add(pfds, n);
		n = rpc_poll_add(pfds, n);
		int r = poll(pfds, (nfds_t)n, timeout);
		if (r < 0 && errno != EINTR) {
			logmsg(3, "poll: %s", strerror(errno));
			continue;
		}
		if (r > 0) {
			proc_poll_handle(pfds, n);
			rpc_poll_handle(pfds, n);
			chan_poll_handle(pfds, n);
		}
		pending_run();
		chan_write_now();
		if (g_shutdown)
			power_off();
	}
}
