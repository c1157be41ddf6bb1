/* Calls kept until they can be answered: Wait, WaitPid, ReadStream, WatchFile. They
 * belong to one connection: a disconnect drops them all (their stream ids mean nothing on
 * the next connection). A call with a ttrpc timeout ends with DEADLINE_EXCEEDED (a
 * WatchFile: changed = false) when it passes. */
#include "agent.h"

#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>

struct pending *g_pending;
int g_inotify_fd = -1;


void pending_add(struct pending *p)
{
	struct pending **pp = &g_pending;
	while (*pp)
		pp = &(*pp)->next;
	p->next = NULL;
	*pp = p;
}

static int wd_in_use(int wd)
{
	for (struct pending *p = g_pending; p; p = p->next)
		if (p->kind == P_WATCH && p->wd == wd)
			return 1;
	return 0;
}

void pending_free(struct pending *p)
{
	free(p->key);
	free(p);
}

/* Unlink p from the list (it was answered) and free it. */
void pending_done(struct pending *p)
{
	for (struct pending **pp = &g_pending; *pp; pp = &(*pp)->next)
		if (*pp == p) {
			*pp = p->next;
			break;
		}
	if (p->kind == P_WATCH && p->wd >= 0 && !wd_in_use(p->wd))
		inotify_rm_watch(g_inotify_fd, p->wd);
	pending_free(p);
}

void pending_drop_all(void)
{
	while (g_pending)
		pending_done(g_pending);
}

void reply_status(uint32_t sid, int status)
{
	struct buf b = {0};
	pb_varint(&b, 1, (uint64_t)(uint32_t)status);
	reply_ok(sid, &b);
	buf_free(&b);
}

void reply_read(uint32_t sid, struct stream *s, uint32_t max)
{
	struct buf data = {0}, b = {0};
	int eof;
	stream_take(s, max, &data, &eof);
	pb_bytes(&b, 1, BUF_DATA(&data), data.len);
	pb_varint(&b, 2, (uint64_t)eof);
	reply_ok(sid, &b);
	buf_free(&data);
	buf_free(&b);
}

static int first_reader(struct pending *me, const char *key, int stream)
{
	for (struct pending *p = g_pending; p && p != me; p = p->next)
		if (p->kind == P_READ && p->stream == stream && !strcmp(p->key, key))
			return 0;
	return 1;
}

/* Answer p if it can be: 1 when answered (the caller unlinks it). */
int pending_try(struct pending *p, int64_t now)
{
	struct key *k;
	int status;
	switch (p->kind) {
	case P_WAIT:
		k = key_find(p->key);
		if (!k) {
			reply_err(p->sid, C_NOTFOUND, "key %s: released", p->key);
			return 1;
		}
		if (k->exited) {
			reply_status(p->sid, k->status);
			return 1;
		}
		break;
	case P_WAITPID:
		k = key_by_pid(p->pid);
		if (k && k->exited) {
			reply_status(p->sid, k->status);
			return 1;
		}
		if (!k && orphan_status(p->pid, &status)) {
			reply_status(p->sid, status);
			return 1;
		}
		break;
	case P_READ:
		k = key_find(p->key);
		if (!k) {
			struct buf b = {0};
			pb_varint(&b, 2, 1);
			reply_ok(p->sid, &b);
			buf_free(&b);
			return 1;
		}
		struct stream *s = &k->st[p->stream - 1];
		if ((s->data.len || s->eof) && first_reader(p, p->key, p->stream)) {
			reply_read(p->sid, s, p->max);
			return 1;
		}
		break;
	}
	if (p->deadline && now >= p->deadline) {
		if (p->kind == P_WATCH)
			reply_ok(p->sid, NULL); /* changed = false */
		else
			reply_err(p->sid, C_DEADLINE, "context deadline exceeded");
		return 1;
	}
	return 0;
}

void pending_run(void)
{
	int64_t now = now_ms();
	struct pending *p = g_pending;
	while (p) {
		struct pending *next = p->next;
		if (pending_try(p, now))
			pending_done(p);
		p = next;
	}
}

int pending_timeout(int timeout)
{
	int64_t now = now_ms();
	for (struct pending *p = g_pending; p; p = p->next) {
		if (!p->deadline)
			continue;
		int64_t left = p->deadline > now ? p->deadline - now : 0;
		if (left > 60000)
			left = 60000;
		if (timeout < 0 || left < timeout)
			timeout = (int)left;
	}
	return timeout;
}

struct pending *pend(uint32_t sid, int kind, const char *key, int64_t timeout_ms)
{
	struct pending *p = calloc(1, sizeof(*p));
	p->sid = sid;
	p->kind = kind;
	p->key = strdup(key ? key : "");
	p->wd = -1;
	p->deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
	return p;
}

