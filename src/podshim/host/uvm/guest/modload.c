/*
 * podshim-modload: /init of a guest image built on Debian's stock kernel
 * (`podshim uvm prepare --stock-kernel`), whose virtio, 9p and overlay drivers are
 * modules. It loads the modules listed in /etc/podshim-modules (one path a line, in
 * dependency order), passing the kernel command line's "<module>.<param>=" arguments
 * as module parameters (QEMU's microvm lists its virtio-mmio devices as
 * virtio_mmio.device=...), then execs the guest agent, which stays PID 1.
 *
 * Static, no libraries: there is nothing else in the initramfs to link against.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AGENT "/sbin/podshim-agent"
#define LIST "/etc/podshim-modules"

static char cmdline[8192];
static int kmsg = -1;

/* to the kernel log (the console): init has no stdio before the agent sets it up */
static void say(const char *what, const char *detail)
{
	char line[512];
	int n = snprintf(line, sizeof(line), "<3>podshim-modload: %s: %s\n", what, detail);

	if (kmsg >= 0 && n > 0)
		(void)!write(kmsg, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

static void read_cmdline(void)
{
	int fd;
	ssize_t n;

	if (mount("proc", "/proc", "proc", 0, NULL))
		return;
	fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		n = read(fd, cmdline, sizeof(cmdline) - 1);
		cmdline[n > 0 ? n : 0] = 0;
		close(fd);
	}
	umount("/proc");
}

/* "name.key=value" arguments of the command line as "key=value key=value" */
static void params_of(const char *name, char *out, size_t size)
{
	char args[sizeof(cmdline)];
	size_t len = strlen(name), used = 0;
	char *save = NULL, *arg;

	out[0] = 0;
	strcpy(args, cmdline);
	for (arg = strtok_r(args, " \n", &save); arg; arg = strtok_r(NULL, " \n", &save)) {
		if (strncmp(arg, name, len) || arg[len] != '.')
			continue;
		int n = snprintf(out + used, size - used, "%s%s", used ? " " : "", arg + len + 1);
		if (n < 0 || (size_t)n >= size - used)
			break;
		used += n;
	}
}

/* the module's name: the file name without ".ko", '-' as '_' */
static void module_name(const char *path, char *out, size_t size)
{
	const char *base = strrchr(path, '/');
	size_t i;

	base = base ? base + 1 : path;
	for (i = 0; base[i] && i + 1 < size; i++) {
		if (!strcmp(base + i, ".ko"))
			break;
		out[i] = base[i] == '-' ? '_' : base[i];
	}
	out[i] = 0;
}

int main(int argc, char **argv)
{
	char line[4096], name[256], params[4096];
	FILE *list;

	(void)argc;
	if (!mount("devtmpfs", "/dev", "devtmpfs", 0, NULL))
		kmsg = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	read_cmdline();
	list = fopen(LIST, "re");
	while (list && fgets(line, sizeof(line), list)) {
		line[strcspn(line, "\n")] = 0;
		if (!line[0])
			continue;
		int fd = open(line, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			say(line, strerror(errno));
			continue;
		}
		module_name(line, name, sizeof(name));
		params_of(name, params, sizeof(params));
		if (syscall(SYS_finit_module, fd, params, 0) && errno != EEXIST)
			say(line, strerror(errno));
		else if (params[0])
			say(name, params);
		close(fd);
	}
	if (!list)
		say(LIST, strerror(errno));
	else
		fclose(list);
	argv[0] = (char *)AGENT;
	if (kmsg >= 0) {
		close(kmsg);
		umount("/dev");
	}
	execv(AGENT, argv);
	return 1;
}
