/*
 * podshim-init: the PID-namespace init of a pod run by podshim's "namespaces" host.
 *
 * Usage: podshim-init [--net PATH] [--ipc PATH] [--uts PATH] [--oom-score-adj N]
 *
 * The program joins the given namespaces (bind-mounted namespace files such as
 * /var/run/netns/cni-..., or podshim's pins), creates a new PID and mount namespace and
 * forks.  The child becomes PID 1 of the new PID namespace; the parent waits until the
 * child has finished hardening itself, prints the child's pid (as this, the outer, PID
 * namespace numbers it) as one line on stdout and exits 0.  On any failure the parent
 * prints the reason on stderr, collects the child and exits 1, so the caller never sees
 * a half-built init.
 *
 * The child (the init):
 *   - points stdin/stdout/stderr at /dev/null and closes every other inherited fd (the
 *     caller reads our stdout to EOF, so no copy of its pipe may survive in the init);
 *   - makes every mount of its new mount namespace private, mounts an empty 4 KiB tmpfs
 *     (mode 0555), pivots into it, detaches the old root entirely and remounts the new
 *     root read-only: /proc/<pid>/root shows an empty directory and nothing of the host;
 *   - shows a short fixed command line, "podshim-init", as pause does: workloads that
 *     share the pod's PID namespace see it as PID 1, so nothing of the host (the paths
 *     of the program, the network namespace, the pins) may show; its environment is
 *     wiped too;
 *   - raises (never lowers) its oom_score_adj when asked to;
 *   - drops every capability (bounding, ambient, effective, permitted, inheritable),
 *     sets no_new_privs and clears the dumpable flag;
 *   - closes every fd, including 0, 1 and 2;
 *   - reaps every child that is reparented to it (processes of the pod's containers
 *     whose parents died) and otherwise sleeps in sigwaitinfo(2).  SIGTERM or SIGINT
 *     make it exit 0; it never exits on its own otherwise.
 *
 * All signals are blocked in the init and collected with sigwaitinfo(2): a blocked
 * signal is never discarded, even for a namespace init with default dispositions.
 *
 * This file is podshim's own code; build: cc -O2 -Wall -Wextra -static -o podshim-init
 * podshim-init.c (the package build does it: setup.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

/* fd on which the child reports to the parent (moved here right after fork) */
#define REPORT_FD 3

/* Directories the tmpfs root may be mounted on (any existing one will do: the mount
 * happens in our private mount namespace and is pivoted away at once). */
static const char *const mount_dirs[] = {"/tmp", "/mnt", "/run", "/var", "/proc", NULL};

static const char *prog = "podshim-init";

/* The child's report: one status byte ('0' ok, '1' failed) then a message. */
static void report(int failed, const char *fmt, ...)
{
	char buf[512];
	int n;
	va_list ap;

	buf[0] = failed ? '1' : '0';
	va_start(ap, fmt);
	n = vsnprintf(buf + 1, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof(buf) - 2)
		n = (int)sizeof(buf) - 2;
	/* a short write loses only part of the message; nothing better to do */
	if (write(REPORT_FD, buf, (size_t)n + 1) < 0) {
		/* nowhere left to report */
	}
}

/* Report a failure of the child (with errno) and exit. */
static void die(const char *what)
{
	report(1, "%s: %s", what, strerror(errno));
	_exit(1);
}

/* Close every fd from `from` upwards. */
static void close_from(unsigned int from)
{
#ifdef SYS_close_range
	if (syscall(SYS_close_range, from, ~0U, 0) == 0)
		return;
#endif
	{
		long max = sysconf(_SC_OPEN_MAX);
		if (max < 0 || max > 1 << 20)
			max = 1 << 20;
		for (long fd = (long)from; fd < max; fd++)
			close((int)fd);
	}
}

/* Join the namespace bind-mounted (or linked) at `path`. */
static void join(const char *path, int nstype, const char *name)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		fprintf(stderr, "%s: open %s namespace %s: %s\n", prog, name, path, strerror(errno));
		exit(1);
	}
	if (setns(fd, nstype) != 0) {
		fprintf(stderr, "%s: setns %s namespace %s: %s\n", prog, name, path, strerror(errno));
		exit(1);
	}
	close(fd);
}

/* Raise oom_score_adj to `want`; a lower value than the inherited one is ignored. */
static void raise_oom_score_adj(long want)
{
	char buf[32];
	long cur;
	ssize_t n;
	int fd = open("/proc/self/oom_score_adj", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		die("open /proc/self/oom_score_adj");
	n = read(fd, buf, sizeof(buf) - 1);
	if (n < 0)
		die("read /proc/self/oom_score_adj");
	buf[n] = '\0';
	cur = strtol(buf, NULL, 10);
	if (want > cur) {
		n = snprintf(buf, sizeof(buf), "%ld", want);
		if (lseek(fd, 0, SEEK_SET) < 0 || write(fd, buf, (size_t)n) != n)
			die("write /proc/self/oom_score_adj");
	}
	close(fd);
}

/* Mount an empty read-only tmpfs, make it our root and detach the old one. */
static void empty_root(void)
{
	const unsigned long fl = MS_NOSUID | MS_NODEV | MS_NOEXEC;
	const char *dir = NULL;

	/* nothing we do below may propagate back to the host */
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
		die("make mounts private");
	for (int i = 0; mount_dirs[i] != NULL; i++) {
		if (mount("tmpfs", mount_dirs[i], "tmpfs", fl, "size=4k,mode=0555") == 0) {
			dir = mount_dirs[i];
			break;
		}
	}
	if (dir == NULL)
		die("mount tmpfs for the init's root");
	if (chdir(dir) != 0)
		die("chdir to the new root");
	/* pivot_root(".", "."): the old root ends up stacked on top of the new one ... */
	if (syscall(SYS_pivot_root, ".", ".") != 0)
		die("pivot_root");
	/* ... and is detached, with every mount below it */
	if (umount2(".", MNT_DETACH) != 0)
		die("detach the old root");
	if (chdir("/") != 0)
		die("chdir /");
	if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY | fl, NULL) != 0)
		die("remount the root read-only");
	if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | fl, NULL) != 0)
		die("remount the root mount read-only");
}

/* Drop every capability for good. */
static void drop_privileges(void)
{
	struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];

	/* the bounding set first: dropping from it needs CAP_SETPCAP, which capset takes */
	for (int cap = 0; cap < 64; cap++) {
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) {
			if (errno == EINVAL) /* past the last capability the kernel knows */
				break;
			die("PR_CAPBSET_DROP");
		}
	}
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
		die("clear ambient capabilities");
	memset(data, 0, sizeof(data));
	if (syscall(SYS_capset, &hdr, data) != 0)
		die("capset");
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		die("PR_SET_NO_NEW_PRIVS");
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
		die("PR_SET_DUMPABLE");
}

/* PID 1: reap everything, exit 0 on SIGTERM/SIGINT, never return otherwise. */
static void __attribute__((noreturn)) init_loop(void)
{
	sigset_t wake;

	sigemptyset(&wake);
	sigaddset(&wake, SIGCHLD);
	sigaddset(&wake, SIGTERM);
	sigaddset(&wake, SIGINT);
	for (;;) {
		int status;
		siginfo_t si;

		/* collect every zombie we have ... */
		while (waitpid(-1, &status, WNOHANG) > 0)
			;
		/* ... then sleep until a child exits or we are told to stop; a SIGCHLD that
		 * arrived since the loop above is pending, so nothing is missed */
		if (sigwaitinfo(&wake, &si) < 0)
			continue;
		if (si.si_signo == SIGTERM || si.si_signo == SIGINT)
			_exit(0);
	}
}

/* Overwrite our argv and environment strings in place: /proc/<pid>/cmdline then reads
 * TITLE (the kernel reads a command line whose last byte is not NUL up to its first
 * NUL, as for setproctitle(3)) and /proc/<pid>/environ only NULs. */
static void hide_cmdline(int argc, char **argv)
{
	static const char title[] = "podshim-init";
	char *start = argv[0];
	char *end = argv[argc - 1] + strlen(argv[argc - 1]) + 1;
	size_t len = (size_t)(end - start);

	for (char **e = environ; e != NULL && *e != NULL; e++)
		memset(*e, 0, strlen(*e));
	memset(start, 0, len);
	if (len > sizeof(title)) {
		memcpy(start, title, sizeof(title));
		start[len - 1] = ' ';
	} else {
		memcpy(start, title, len - 1);
	}
}

/* The child after fork: become the hardened init, report, and loop. */
static void __attribute__((noreturn))
child(int report_fd, long oom_adj, int set_oom, int argc, char **argv)
{
	int null;

	/* the report pipe goes to a fixed fd, then every other inherited fd is closed */
	if (report_fd != REPORT_FD) {
		if (dup2(report_fd, REPORT_FD) < 0)
			_exit(1);
		close(report_fd);
	}
	null = open("/dev/null", O_RDWR);
	if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0)
		die("redirect stdio to /dev/null");
	close_from(REPORT_FD + 1);
	if (setsid() < 0)
		die("setsid");
	/* default dispositions for what we wait for (SIG_IGN on SIGCHLD would auto-reap) */
	signal(SIGCHLD, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	hide_cmdline(argc, argv);
	if (set_oom)
		raise_oom_score_adj(oom_adj); /* needs /proc: before the root goes away */
	empty_root();
	drop_privileges();
	report(0, "ok");
	close_from(0); /* every fd, stdio and the report pipe included */
	init_loop();
}

static void usage(void)
{
	fprintf(stderr,
		"usage: %s [--net PATH] [--ipc PATH] [--uts PATH] [--oom-score-adj N]\n", prog);
	exit(2);
}

int main(int argc, char **argv)
{
	const char *net = NULL, *ipc = NULL, *uts = NULL;
	long oom_adj = 0;
	int set_oom = 0, pipefd[2], status;
	sigset_t all, old;
	char msg[512];
	size_t got = 0;
	pid_t pid;

	for (int i = 1; i < argc; i++) {
		const char *opt = argv[i];
		if (i + 1 >= argc)
			usage();
		if (strcmp(opt, "--net") == 0) {
			net = argv[++i];
		} else if (strcmp(opt, "--ipc") == 0) {
			ipc = argv[++i];
		} else if (strcmp(opt, "--uts") == 0) {
			uts = argv[++i];
		} else if (strcmp(opt, "--oom-score-adj") == 0) {
			char *end;
			errno = 0;
			oom_adj = strtol(argv[++i], &end, 10);
			if (errno != 0 || *end != '\0' || end == argv[i] || oom_adj < -1000 ||
			    oom_adj > 1000) {
				fprintf(stderr, "%s: bad --oom-score-adj %s\n", prog, argv[i]);
				exit(2);
			}
			set_oom = 1;
		} else {
			usage();
		}
	}

	if (net != NULL)
		join(net, CLONE_NEWNET, "network");
	if (ipc != NULL)
		join(ipc, CLONE_NEWIPC, "ipc");
	if (uts != NULL)
		join(uts, CLONE_NEWUTS, "uts");
	if (unshare(CLONE_NEWPID | CLONE_NEWNS) != 0) {
		fprintf(stderr, "%s: unshare pid+mount namespaces: %s\n", prog, strerror(errno));
		exit(1);
	}
	if (pipe2(pipefd, O_CLOEXEC) != 0) {
		fprintf(stderr, "%s: pipe: %s\n", prog, strerror(errno));
		exit(1);
	}
	/* the init starts with every signal blocked: none may be lost or act before it
	 * waits for them */
	sigfillset(&all);
	sigprocmask(SIG_SETMASK, &all, &old);
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		fprintf(stderr, "%s: fork: %s\n", prog, strerror(errno));
		exit(1);
	}
	if (pid == 0) {
		close(pipefd[0]);
		child(pipefd[1], oom_adj, set_oom, argc, argv);
	}
	sigprocmask(SIG_SETMASK, &old, NULL);
	close(pipefd[1]);
	/* read the child's report until it closes the pipe (after success) or dies */
	for (;;) {
		ssize_t n = read(pipefd[0], msg + got, sizeof(msg) - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
		if (got == sizeof(msg) - 1)
			break;
	}
	msg[got] = '\0';
	if (got > 0 && msg[0] == '0') {
		printf("%d\n", (int)pid);
		if (fflush(stdout) != 0) {
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			return 1;
		}
		return 0;
	}
	fprintf(stderr, "%s: init failed: %s\n", prog, got > 1 ? msg + 1 : "no report (it died)");
	kill(pid, SIGKILL);
	waitpid(pid, &status, 0);
	return 1;
}
