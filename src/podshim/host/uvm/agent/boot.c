/* PID 1 in the guest: the boot steps before serving, and finding the host channel. */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define GUEST_SHARE "/run/podshim/share"
#define GUEST_SHM "/run/podshim/shm"
#define SHARE_TAG "podshim"
#define TOOLS_TAG "podshim-tools"
#define GUEST_TOOLS "/.tools"
#define PORT_NAME "podshim.agent"

static void do_mount(const char *src, const char *dst, const char *type, unsigned long flags,
		     const char *data)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, flags, data) && errno != EBUSY)
		logmsg(3, "mount %s on %s: %s", type ? type : src, dst, strerror(errno));
}

/* The initramfs root is "rootfs", which pivot_root cannot leave: put a bind mount of it
 * in its place (rbind onto a directory, move that onto /, chroot). */
static void leave_rootfs(void)
{
	mkdir("/root", 0700);
	if (mount("/", "/root", NULL, MS_BIND | MS_REC, NULL) || chdir("/root") ||
	    mount(".", "/", NULL, MS_MOVE, NULL) || chroot(".") || chdir("/"))
		logmsg(3, "moving the root off rootfs: %s", strerror(errno));
}

static void cgroups(void)
{
	const char *ctl = "/sys/fs/cgroup/cgroup.subtree_control";
	int fd = open(ctl, O_WRONLY | O_CLOEXEC);
	static const char all[] = "+cpuset +cpu +io +memory +pids";
	if (fd >= 0 && write(fd, all, sizeof(all) - 1) < 0) {
		/* one is missing from the kernel: enable those that are there */
		static const char *const one[] = {"+cpuset", "+cpu", "+io", "+memory", "+pids"};
		for (size_t i = 0; i < sizeof(one) / sizeof(one[0]); i++)
			if (write(fd, one[i], strlen(one[i])) < 0)
				logmsg(4, "cgroup controller %s: %s", one[i] + 1, strerror(errno));
	}
	if (fd >= 0)
		close(fd);
}

/* The podshim.* arguments of the kernel command line: podshim.hostname=<name> and
 * podshim.net=<address>,<netmask>,<gateway>,<mtu> (IPv4; no gateway: no default route). */
static int parse_cmdline(char *hostname, size_t hlen, char *net, size_t nlen)
{
	struct buf cmd = {0};
	hostname[0] = net[0] = 0;
	if (read_file_into("/proc/cmdline", &cmd, 8192)) {
		buf_free(&cmd);
		return -1;
	}
	buf_append(&cmd, "", 1);
	for (char *tok = strtok((char *)BUF_DATA(&cmd), " \n"); tok; tok = strtok(NULL, " \n")) {
		if (!strncmp(tok, "podshim.hostname=", 17))
			snprintf(hostname, hlen, "%s", tok + 17);
		else if (!strncmp(tok, "podshim.net=", 12))
			snprintf(net, nlen, "%s", tok + 12);
	}
	buf_free(&cmd);
	return 0;
}

/* The two 9p mounts wait on QEMU's file server (~12 ms each under TCG): a thread makes
 * them while PID 1 goes on to answer; boot_settle() waits for it before any request but
 * Ping (anything else may use them). */
static pthread_t g_mounter;
static int g_mounting;

static void *mount_shares(void *arg)
{
	if (mount(SHARE_TAG, GUEST_SHARE, "9p", 0,
		  "trans=virtio,version=9p2000.L,msize=262144,access=any"))
		logmsg(4, "no pod share at %s: %s (going on without it)", GUEST_SHARE,
		       strerror(errno));
	/* runc, crun, their libraries and busybox: read-only from the host, shared by
	 * every VM (the initrd holds symlinks into it); loose caching: they never change */
	if (mount(TOOLS_TAG, GUEST_TOOLS, "9p", MS_RDONLY | MS_NODEV | MS_NOSUID,
		  "trans=virtio,version=9p2000.L,msize=262144,cache=loose"))
		logmsg(3, "no guest tools at %s: %s (runc is missing)", GUEST_TOOLS,
		       strerror(errno));
	return arg;
}

void boot_settle(void)
{
	if (g_mounting) {
		pthread_join(g_mounter, NULL);
		g_mounting = 0;
	}
}

static int ipv4(struct sockaddr *sa, const char *text)
{
	struct sockaddr_in *in = (struct sockaddr_in *)sa;
	memset(in, 0, sizeof(*in));
	in->sin_family = AF_INET;
	return inet_pton(AF_INET, text, &in->sin_addr) == 1 ? 0 : -1;
}

static int route(int s, const char *gateway, int host)
{
	struct rtentry rt = {0};
	char dev[] = "eth0";
	if (host) { /* the gateway itself, on the link (an off-subnet gateway: /32 pods) */
		ipv4(&rt.rt_dst, gateway);
		ipv4(&rt.rt_genmask, "255.255.255.255");
		ipv4(&rt.rt_gateway, "0.0.0.0");
		rt.rt_flags = RTF_UP | RTF_HOST;
	} else {
		ipv4(&rt.rt_dst, "0.0.0.0");
		ipv4(&rt.rt_genmask, "0.0.0.0");
		ipv4(&rt.rt_gateway, gateway);
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
	}
	rt.rt_dev = dev;
	return ioctl(s, SIOCADDRT, &rt) && errno != EEXIST ? -1 : 0;
}

/* eth0 as the pod's: address, netmask, MTU, up, default route. The kernel's ip= did the
 * same but waited for a carrier (~30 ms under TCG) and could not set the MTU. -1 (with
 * the reason logged): the pod's network cannot be what CRI made it. */
static int net_up(const char *spec)
{
	char copy[160], *field[4] = {0};
	snprintf(copy, sizeof(copy), "%s", spec);
	char *p = copy;
	for (int i = 0; i < 4; i++) {
		field[i] = p;
		p = strchr(p, ',');
		if (!p && i < 3) {
			logmsg(2, "podshim.net=%s: want address,netmask,gateway,mtu", spec);
			return -1;
		}
		if (p)
			*p++ = 0;
	}
	struct ifreq ifr = {0};
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	const char *step = "socket";
	int ok = s >= 0;
	strcpy(ifr.ifr_name, "eth0");
	if (ok && (step = "address", ipv4(&ifr.ifr_addr, field[0]) || ioctl(s, SIOCSIFADDR, &ifr)))
		ok = 0;
	if (ok && (step = "netmask", ipv4(&ifr.ifr_netmask, field[1]) ||
				     ioctl(s, SIOCSIFNETMASK, &ifr)))
		ok = 0;
	ifr.ifr_mtu = atoi(field[3]);
	if (ok && ifr.ifr_mtu != 1500 && (step = "mtu", ifr.ifr_mtu < 68 || ioctl(s, SIOCSIFMTU, &ifr)))
		ok = 0;
	if (ok && (step = "up", ioctl(s, SIOCGIFFLAGS, &ifr)))
		ok = 0;
	ifr.ifr_flags |= IFF_UP;
	if (ok && ioctl(s, SIOCSIFFLAGS, &ifr))
		ok = 0;
	if (ok && field[2][0] && (step = "default route", route(s, field[2], 0))) {
		if (errno != ENETUNREACH || route(s, field[2], 1) || route(s, field[2], 0))
			ok = 0;
	}
	if (!ok)
		logmsg(2, "eth0 %s (podshim.net=%s): %s", step, spec, strerror(errno));
	if (s >= 0)
		close(s);
	return ok ? 0 : -1;
}

static void loopback_up(void)
{
	struct ifreq ifr = {0};
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	strcpy(ifr.ifr_name, "lo");
	if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) ||
	    (ifr.ifr_flags |= IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr)))
		logmsg(3, "lo up: %s", strerror(errno));
	if (s >= 0)
		close(s);
}

int boot(void)
{
	leave_rootfs();
	do_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	log_open_kmsg();
	do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	do_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		 "newinstance,ptmxmode=0666,mode=0620,gid=5");
	unlink("/dev/ptmx");
	if (symlink("pts/ptmx", "/dev/ptmx"))
		logmsg(3, "/dev/ptmx: %s", strerror(errno));
	do_mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	do_mount("run", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	do_mount("tmp", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	do_mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	cgroups();
	mkdirs("/run/podshim", 0755);
	do_mount("shm", GUEST_SHM, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mkdir(GUEST_SHARE, 0755);
	if (pthread_create(&g_mounter, NULL, mount_shares, NULL) == 0)
		g_mounting = 1;
	else
		mount_shares(NULL);
	mkdir("/run/runc", 0700);
	loopback_up();
	char name[256], net[160];
	if (parse_cmdline(name, sizeof(name), net, sizeof(net)))
		logmsg(3, "/proc/cmdline: %s", strerror(errno));
	if (name[0] && sethostname(name, strlen(name)))
		logmsg(3, "sethostname %s: %s", name, strerror(errno));
	return net[0] ? net_up(net) : 0;
}

static int find_port(char *dev, size_t len)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	struct dirent *e;
	int found = 0;
	while (d && !found && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char path[300];
		struct buf name = {0};
		snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
		if (!read_file_into(path, &name, 64) && name.len >= strlen(PORT_NAME) &&
		    !memcmp(BUF_DATA(&name), PORT_NAME, strlen(PORT_NAME)) &&
		    (name.len == strlen(PORT_NAME) || BUF_DATA(&name)[strlen(PORT_NAME)] == '\n')) {
			snprintf(dev, len, "/dev/%s", e->d_name);
			found = 1;
		}
		buf_free(&name);
	}
	if (d)
		closedir(d);
	return found;
}

/* The virtio-serial port named PORT_NAME; its name comes from the host a little after
 * the device, so look again (every 5 ms) for up to 10 s. */
int open_port(void)
{
	char dev[300];
	int64_t end = now_ms() + 10000;
	for (;;) {
		if (find_port(dev, sizeof(dev))) {
			int fd = open(dev, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
			if (fd >= 0)
				return fd;
			if (errno != ENOENT)
				logmsg(3, "open %s: %s", dev, strerror(errno));
		}
		if (now_ms() > end)
			return -1;
		struct timespec ts = {0, 5000000};
		nanosleep(&ts, NULL);
	}
}
