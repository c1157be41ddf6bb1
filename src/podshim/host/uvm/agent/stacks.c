/* Stacks: the agent's own state, and the guest kernel's task list. */
#include "agent.h"

#include <ctype.h>
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define TASKS_MAX (2u << 20)

static const char *const kind_names[] = {"?", "Wait", "WaitPid", "ReadStream", "WatchFile"};

static void describe_agent(struct buf *b)
{
	buf_printf(b, "podshim-agent %s pid %d%s, connection %llu\n", AGENT_VERSION, getpid(),
		   g_pid1 ? " (init)" : "", (unsigned long long)chan_generation());
	for (struct key *k = g_keys; k; k = k->next) {
		buf_printf(b, "key %s pid %d ", k->name, k->pid);
		if (k->exited)
			buf_printf(b, "exited %d", k->status);
		else
			buf_printf(b, "running");
		for (int i = 0; i < 2; i++)
			buf_printf(b, " %s %zu bytes%s", i ? "stderr" : "stdout", k->st[i].data.len,
				   k->st[i].eof ? " eof" : "");
		buf_printf(b, " stdin %s %zu queued%s%s\n", k->in_fd >= 0 ? "open" : "closed",
			   k->inq.len, k->tty >= 0 ? " tty" : "",
			   k->csock >= 0 ? " console-socket" : "");
	}
	for (struct pending *p = g_pending; p; p = p->next) {
		buf_printf(b, "pending %s stream %u", kind_names[p->kind], p->sid);
		if (p->kind == P_WAITPID)
			buf_printf(b, " pid %d", p->pid);
		else if (*p->key)
			buf_printf(b, " key %s", p->key);
		if (p->kind == P_READ)
			buf_printf(b, " %s", p->stream == 1 ? "stdout" : "stderr");
		if (p->deadline)
			buf_printf(b, " deadline in %lld ms", (long long)(p->deadline - now_ms()));
		buf_printf(b, "\n");
	}
	orphans_describe(b);
}

static void strip(struct buf *b)
{
	while (b->len && isspace(BUF_DATA(b)[b->len - 1]))
		b->len--;
}

static void describe_tasks(struct buf *out)
{
	DIR *d = opendir("/proc");
	if (!d) {
		buf_printf(out, "/proc: unreadable\n");
		return;
	}
	struct dirent *e;
	char path[300];
	while ((e = readdir(d)) && out->len < TASKS_MAX) {
		if (!isdigit((unsigned char)e->d_name[0]))
			continue;
		struct buf comm = {0}, stat = {0}, wchan = {0}, stack = {0};
		snprintf(path, sizeof(path), "/proc/%s/comm", e->d_name);
		read_file_into(path, &comm, 64);
		strip(&comm);
		snprintf(path, sizeof(path), "/proc/%s/stat", e->d_name);
		read_file_into(path, &stat, 512);
		char state = '?';
		buf_append(&stat, "", 1);
		const char *rp = strrchr((const char *)BUF_DATA(&stat), ')');
		if (rp && rp[1] == ' ')
			state = rp[2];
		snprintf(path, sizeof(path), "/proc/%s/wchan", e->d_name);
		read_file_into(path, &wchan, 128);
		snprintf(path, sizeof(path), "/proc/%s/stack", e->d_name);
		read_file_into(path, &stack, 16384);
		strip(&stack);
		buf_printf(out, "%s %.*s %c %.*s\n", e->d_name, (int)comm.len,
			   (const char *)BUF_DATA(&comm), state, (int)wchan.len,
			   (const char *)BUF_DATA(&wchan));
		if (stack.len) {
			buf_append(&stack, "", 1);
			for (char *line = strtok((char *)BUF_DATA(&stack), "\n"); line;
			     line = strtok(NULL, "\n"))
				buf_printf(out, "    %s\n", line);
		}
		buf_free(&comm);
		buf_free(&stat);
		buf_free(&wchan);
		buf_free(&stack);
	}
	closedir(d);
}

void rpc_stacks(uint32_t sid)
{
	struct buf agent = {0}, tasks = {0}, b = {0};
	describe_agent(&agent);
	describe_tasks(&tasks);
	if (agent.len > REPLY_MAX / 4)
		agent.len = REPLY_MAX / 4;
	if (tasks.len > REPLY_MAX / 2)
		tasks.len = REPLY_MAX / 2;
	/* proto3 strings must be UTF-8: comm names and truncation could break that */
	for (size_t i = 0; i < agent.len; i++)
		if (BUF_DATA(&agent)[i] >= 0x80)
			BUF_DATA(&agent)[i] = '?';
	for (size_t i = 0; i < tasks.len; i++)
		if (BUF_DATA(&tasks)[i] >= 0x80)
			BUF_DATA(&tasks)[i] = '?';
	pb_bytes(&b, 1, BUF_DATA(&agent), agent.len);
	pb_bytes(&b, 2, BUF_DATA(&tasks), tasks.len);
	reply_ok(sid, &b);
	buf_free(&agent);
	buf_free(&tasks);
	buf_free(&b);
}
