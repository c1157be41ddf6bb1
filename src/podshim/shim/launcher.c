/*
 * containerd-shim-podshim-v1: the launcher in front of podshim's Python shim.
 *
 * containerd runs the shim binary for `start` (every task) and for `delete` (after every
 * task removal, on its critical path).  Python's start-up alone costs tens of
 * milliseconds; this program answers the two common cases itself in about a millisecond
 * and execs the Python shim, `containerd-shim-podshim-v1-py` next to it, for everything
 * else, with the same argv, environment and cwd (and, for `start`, the same stdin bytes).
 *
 *   start:  the group's shim already listens.  The group and the socket path are computed
 *           exactly as src/podshim/shim/paths.py and start.py do (pod scope; node scope
 *           only with a valid settings cache left by Python's start); when a connect to
 *           that socket succeeds, <bundle>/address is written and printed.  In pod
 *           scope with the zygote on (the default) and a zygote listening, a new
 *           group's daemon is forked by it (launcher_zygote.c) and printed the same way.
 *   delete: the shim marked the bundle `podshim-deleted` (nothing is left of the task) and
 *           no panic.log is there: print DeleteResponse{pid (init.pid), 137, now}.
 *
 * It never creates a shim, never removes anything and never reads TOML: whatever is
 * unusual (a flag it does not know, a config.json it cannot read the simple way, a dead
 * socket, a config that names shim_scope without a fresh cache...) goes to Python, whose
 * answer is then the only one.  SHA-256 is written from FIPS 180-4.
 *
 * This file is podshim's own code; build: cc -O2 -static -DPODSHIM_VERSION='"x.y.z"'
 * (the package build does it: setup.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "launcher.h"

#ifndef PODSHIM_VERSION
#define PODSHIM_VERSION "" /* unknown: no node-scope fast path */
#endif

#define NAME "containerd-shim-podshim-v1"
#define PY_ENTRY NAME "-py"
#define GROUP_ANNOTATION "io.containerd.podshim.v1.group"
#define SANDBOX_ANNOTATION "io.kubernetes.cri.sandbox-id"
#define OPTIONS_TYPE "runtimeoptions.v1.Options"
#define MAX_OPTIONS 65536 /* start.py reads the options with one os.read(0, 1 << 16) */
#define MAX_SHARDS 64

/* ---- small helpers ---------------------------------------------------------------- */

/* Valid UTF-8 without surrogates: what Python decodes and encodes back to the same bytes. */
static int utf8_ok(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = s[i], need, min;
        uint32_t cp;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xc2 && c <= 0xdf) { need = 1; min = 0x80; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { need = 2; min = 0x800; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { need = 3; min = 0x10000; cp = c & 0x07; }
        else return 0;
        for (unsigned k = 1; k <= need; k++) {
            if (i + k >= n || (s[i + k] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        i += need + 1;
    }
    return 1;
}

static int str_ok(const char *s) { return s && utf8_ok((const unsigned char *)s, strlen(s)); }

static int ascii(const char *s) {
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80) return 0;
    return 1;
}

/* os.path.join(a, b) for a relative b. */
static int join(char *out, size_t size, const char *a, const char *b) {
    size_t n = strlen(a);
    const char *sep = (n == 0 || a[n - 1] == '/') ? "" : "/";
    int w = snprintf(out, size, "%s%s%s", a, sep, b);
    return w >= 0 && (size_t)w < size ? 0 : -1;
}

/* The whole file at path in a malloc'd buffer (NUL-terminated); NULL on any error. */
static char *slurp(const char *path, size_t *len, int *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t cap = 4096, n = 0;
    char *buf = NULL;
    *err = 0;
    if (fd < 0) { *err = errno; return NULL; }
    for (;;) {
        if (n + 1 >= cap || !buf) {
            char *b = realloc(buf, cap *= 2);
            if (!b) { *err = ENOMEM; break; }
            buf = b;
        }
        ssize_t r = read(fd, buf + n, cap - n - 1);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { *err = errno; break; }
        if (r == 0) { close(fd); buf[n] = 0; *len = n; return buf; }
        n += (size_t)r;
    }
    close(fd);
    free(buf);
    return NULL;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w, n -= (size_t)w;
    }
    return 0;
}

/* ---- flags (src/podshim/shim/flags.py: Go's flag package) ----------------------- */

struct flags {
    const char *namespace, *id, *bundle, *address, *action;
    int version, debug;
};

static int lower_in(const char *v, const char *const *set) {
    for (; *set; set++)
        if (strcasecmp(v, *set) == 0 && ascii(v)) return 1;
    return 0;
}

/* 0, or -1 where flags.py raises FlagError (Python then prints the error). */
static int parse_flags(int argc, char **argv, struct flags *f) {
    static const char *const value_flags[] = {"namespace", "id", "socket", "bundle", "address",
                                              "publish-binary", "log-format", "node", NULL};
    static const char *const bools[] = {"", "0", "1", "t", "f", "true", "false", NULL};
    static const char *const trues[] = {"", "1", "t", "true", NULL};
    int i = 1;
    memset(f, 0, sizeof *f);
    f->namespace = f->id = f->bundle = f->address = f->action = "";
    for (; i < argc; i++) {
        const char *arg = argv[i], *name = arg, *value;
        if (strcmp(arg, "--") == 0) { i++; break; }
        if (arg[0] != '-' || strcmp(arg, "-") == 0) break;
        while (*name == '-') name++;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        if ((len == 5 && !strncmp(name, "debug", 5)) || (len == 1 && name[0] == 'v')) {
            if (eq && !lower_in(eq + 1, bools)) return -1;
            if (name[0] == 'v') f->version = eq ? lower_in(eq + 1, trues) : 1;
            else f->debug = eq ? lower_in(eq + 1, trues) : 1;
            continue;
        }
        int known = 0;
        for (const char *const *v = value_flags; *v; v++)
            known |= strlen(*v) == len && !strncmp(name, *v, len);
        if (!known) return -1;
        if (eq) value = eq + 1;
        else if (++i < argc) value = argv[i];
        else return -1;
        if (len == 9 && !strncmp(name, "namespace", 9)) f->namespace = value;
        else if (len == 2 && !strncmp(name, "id", 2)) f->id = value;
        else if (len == 6 && !strncmp(name, "bundle", 6)) f->bundle = value;
        else if (len == 7 && !strncmp(name, "address", 7)) f->address = value;
    }
    if (i < argc) f->action = argv[i];
    return 0;
}

/* ---- the Python shim -------------------------------------------------------------- */

static int entry_in(char *out, size_t size, const char *file) {
    char dir[PATH_MAX];
    struct stat st;
    if (snprintf(dir, sizeof dir, "%s", file) >= (int)sizeof dir) return -1;
    char *slash = strrchr(dir, '/');
    if (!slash) return -1;
    *slash = 0;
    if (join(out, size, *dir ? dir : "/", PY_ENTRY) < 0) return -1;
    return stat(out, &st) == 0 && S_ISREG(st.st_mode) && access(out, X_OK) == 0 ? 0 : -1;
}

/* <dir of /proc/self/exe>/containerd-shim-podshim-v1-py, else next to argv[0] resolved. */
static int find_entry(char *out, size_t size, const char *argv0) {
    char self[PATH_MAX], found[PATH_MAX], real[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = 0;
        if (entry_in(out, size, self) == 0) return 0;
    }
    const char *me = argv0;
    if (!strchr(argv0, '/')) { /* found through PATH, as a shell or Go's exec finds it */
        const char *path = getenv("PATH");
        me = NULL;
        while (path && *path && !me) {
            size_t len = strcspn(path, ":");
            if (snprintf(found, sizeof found, "%.*s/%s", (int)len, path, argv0) <
                    (int)sizeof found && access(found, X_OK) == 0)
                me = found;
            path += len + (path[len] == ':');
        }
    }
    if (me && entry_in(out, size, me) == 0) return 0;
    return me && realpath(me, real) && entry_in(out, size, real) == 0 ? 0 : -1;
}

/* Everything but the fast paths: exec the Python shim. opts (len >= 0) become its stdin. */
static void run_python(char **argv, const char *opts, ssize_t len) {
    char entry[PATH_MAX];
    if (find_entry(entry, sizeof entry, argv[0]) < 0) {
        fprintf(stderr, NAME ": cannot find the Python shim " PY_ENTRY
                " next to this program (%s): is podshim installed completely?\n", argv[0]);
        exit(1);
    }
    if (len >= 0) { /* the options this program read from stdin, for Python to read again */
        int fd = memfd_create("podshim-options", MFD_CLOEXEC);
        if (fd < 0 || write_all(fd, opts, (size_t)len) < 0 || lseek(fd, 0, SEEK_SET) < 0 ||
            dup2(fd, 0) < 0) {
            fprintf(stderr, NAME ": cannot pass the runtime options on: %s\n", strerror(errno));
            exit(1);
        }
        close(fd);
    }
    execv(entry, argv);
    fprintf(stderr, NAME ": exec %s: %s\n", entry, strerror(errno));
    exit(1);
}

/* ---- start ------------------------------------------------------------------------ */

static int valid_id(const char *v, size_t n) { /* src/podshim/oci/ids.py */
    int after_sep = 1;
    if (n == 0 || n > 76) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = v[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
            after_sep = 0;
        else if ((c == '.' || c == '_' || c == '-') && !after_sep)
            after_sep = 1;
        else
            return 0;
    }
    return !after_sep;
}

/* paths.bundle_group: the group annotation, else the sandbox id, else the task id, found
 * as compact "key":"value" in config.json.  NULL where Python would parse the JSON. */
static const char *bundle_group(const char *bundle, const char *id, char *buf, size_t size) {
    static const char *const keys[] = {GROUP_ANNOTATION, SANDBOX_ANNOTATION, NULL};
    size_t len;
    int err;
    char path[PATH_MAX], pat[80], *raw;
    if (join(path, sizeof path, bundle, "config.json") < 0) return NULL;
    raw = slurp(path, &len, &err);
    const char *group = NULL;
    if (!raw) return err == ENOMEM ? NULL : id; /* unreadable: the task id, as Python */
    for (const char *const *k = keys; *k && !group; k++) {
        snprintf(pat, sizeof pat, "\"%s\":\"", *k);
        char *at = memmem(raw, len, pat, strlen(pat));
        if (at) {
            char *v = at + strlen(pat), *end = memchr(v, '"', len - (size_t)(v - raw));
            if (!end || !valid_id(v, (size_t)(end - v)) || (size_t)(end - v) >= size) break;
            memcpy(buf, v, (size_t)(end - v));
            buf[end - v] = 0;
            group = buf;
            break;
        }
        snprintf(pat, sizeof pat, "\"%s\"", *k);
        if (memmem(raw, len, pat, strlen(pat))) break; /* not compact: Python parses it */
        if (!k[1]) group = id;
    }
    free(raw);
    return group;
}

/* A varint at d[*i]: -1 when cut short (Python's IndexError), 1 when it needs more than
 * 64 bits (only its low bits are kept), else 0. */
static int varint(const unsigned char *d, size_t n, size_t *i, uint64_t *v) {
    int shift = 0, big = 0;
    *v = 0;
    for (;;) {
        if (*i >= n) return -1;
        unsigned char b = d[(*i)++];
        uint64_t bits = b & 0x7f;
        if (shift < 64) {
            *v |= bits << shift;
            big |= shift > 57 && bits >> (64 - shift) != 0;
        } else {
            big |= bits != 0;
        }
        shift += 7;
        if (!(b & 0x80)) return big;
    }
}

/* start.py's _pb_fields(data).get(field, b"") */
static void pb_field(const unsigned char *d, size_t n, uint64_t field,
                     const unsigned char **out, size_t *out_len) {
    size_t i = 0;
    uint64_t key, len;
    int big_key, big_len;
    *out = d, *out_len = 0;
    while (i < n) {
        if ((big_key = varint(d, n, &i, &key)) < 0) return;
        if ((key & 7) == 2) {
            if ((big_len = varint(d, n, &i, &len)) < 0) return;
            size_t take = !big_len && len < n - i ? (size_t)len : n - i;
            if (!big_key && key >> 3 == field) *out = d + i, *out_len = take; /* last wins */
            i += take;
        } else if ((key & 7) == 0) {
            if (varint(d, n, &i, &len) < 0) return;
        } else {
            return;
        }
    }
}

/* The node-scope settings cache start.py writes: the shards, when it matches the config
 * file as it is now and this program's version; -1 otherwise. */
static int cached_shards(const char *run, const char *config) {
    char hex[65], name[40], dir[PATH_MAX], path[PATH_MAX], want[256];
    struct stat st;
    size_t len;
    int err, shards = 0;
    if (!*PODSHIM_VERSION || stat(config, &st) < 0) return -1;
    sha256_hex(config, strlen(config), hex);
    snprintf(name, sizeof name, "%.16s", hex);
    if (join(dir, sizeof dir, run, "settings") < 0 || join(path, sizeof path, dir, name) < 0)
        return -1;
    char *text = slurp(path, &len, &err), *p;
    if (!text) return -1;
    const char *head = "podshim-start-settings 1 " PODSHIM_VERSION " node ";
    p = text + strlen(head);
    if (strncmp(text, head, strlen(head)) == 0) {
        while (*p >= '0' && *p <= '9' && shards <= MAX_SHARDS) shards = shards * 10 + *p++ - '0';
        snprintf(want, sizeof want, " %llu %llu %lld %lld %lld\n",
                 (unsigned long long)st.st_dev, (unsigned long long)st.st_ino,
                 (long long)st.st_size,
                 (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec,
                 (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec);
        if (shards < 1 || shards > MAX_SHARDS || strncmp(p, want, strlen(want)) != 0 ||
            strcmp(p + strlen(want), config) != 0 || len != strlen(text))
            shards = -1;
    } else {
        shards = -1;
    }
    free(text);
    return shards;
}

/* Pod scope unless the config names shim_scope (or escapes a key): 1 pod, 0 ask Python.
 * *zygote: whether the config leaves `zygote` at its default (on). */
static int plainly_pod_scope(const char *config, int *zygote) {
    size_t len;
    int err;
    char *text = slurp(config, &len, &err);
    *zygote = 0;
    if (!text) return err != ENOMEM; /* unreadable: start.py reads no settings: pod */
    int pod = !memmem(text, len, "shim_scope", 10) && !memchr(text, '\\', len);
    *zygote = pod && !memmem(text, len, "zygote", 6);
    free(text);
    return pod;
}

/* start.settings: the zygote forks a pod-scope daemon unless PODSHIM_ZYGOTE turns it
 * off or the config names `zygote` (then Python reads it; an environment value that
 * turns it on wins over the config). */
static int zygote_wanted(int config_default) {
    static const char *const on[] = {"1", "true", "yes", NULL};
    const char *env = getenv("PODSHIM_ZYGOTE");
    if (env && *env) return lower_in(env, on);
    return config_default;
}

static int start(const struct flags *f, const char *opts, size_t opts_len) {
    char cwd[PATH_MAX], groupbuf[128], config[4097], key[160], hex[65], hex2[65];
    char name[4096 + 160], run_s[PATH_MAX], sock[PATH_MAX], addr[PATH_MAX + 8], path[PATH_MAX];
    const unsigned char *any, *value, *type, *cp;
    size_t any_len = opts_len, value_len, type_len, cp_len;
    const char *group, *run = getenv("PODSHIM_RUN_DIR");
    int shards = 0, zygote = 1;

    if (!*f->id || !*f->namespace || !*f->address || !getcwd(cwd, sizeof cwd)) return -1;
    if (!str_ok(f->address) || !str_ok(f->namespace)) return -1;
    if (!(group = bundle_group(cwd, f->id, groupbuf, sizeof groupbuf)) || !str_ok(group)) return -1;
    any = (const unsigned char *)opts;
    pb_field(any, any_len, 1, &type, &type_len);
    config[0] = 0;
    if (type_len >= strlen(OPTIONS_TYPE)) {
        const unsigned char *slash = type;
        for (size_t i = 0; i < type_len; i++)
            if (type[i] == '/') slash = type + i + 1;
        if ((size_t)(type + type_len - slash) == strlen(OPTIONS_TYPE) &&
            !memcmp(slash, OPTIONS_TYPE, strlen(OPTIONS_TYPE))) {
            pb_field(any, any_len, 2, &value, &value_len);
            pb_field(value, value_len, 2, &cp, &cp_len);
            if (cp_len >= sizeof config || memchr(cp, 0, cp_len) || !utf8_ok(cp, cp_len))
                return -1;
            memcpy(config, cp, cp_len);
            config[cp_len] = 0;
        }
    }
    if (!run || !*run) run = "/run/podshim";
    if (!ascii(run) || join(run_s, sizeof run_s, run, "s") < 0) return -1;
    if (*config && (shards = cached_shards(run, config)) < 0 &&
        !plainly_pod_scope(config, &zygote))
        return -1;
    if (shards > 0) { /* node scope: start.node_key, one socket for all namespaces */
        unsigned shard = 0;
        sha256_hex(config, strlen(config), hex);
        if (shards > 1) {
            sha256_hex(group, strlen(group), hex2);
            hex2[8] = 0;
            shard = (unsigned)(strtoul(hex2, NULL, 16) % (unsigned long)shards);
        }
        snprintf(key, sizeof key, "node-%s-%.12s-%u", PODSHIM_VERSION, hex, shard);
        if (snprintf(name, sizeof name, "%s//%s", f->address, key) >= (int)sizeof name) return -1;
    } else if (snprintf(name, sizeof name, "%s/%s/%s", f->address, f->namespace, group) >=
               (int)sizeof name) {
        return -1;
    }
    sha256_hex(name, strlen(name), hex);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (join(sock, sizeof sock, run_s, hex) < 0 || strlen(sock) >= sizeof sa.sun_path) return -1;
    memcpy(sa.sun_path, sock, strlen(sock) + 1);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    int up = connect(s, (struct sockaddr *)&sa, sizeof sa) == 0;
    close(s);
    if (!up) { /* no shim there yet: the zygote forks one (pod scope), else Python starts one */
        char zpath[PATH_MAX]; /* zygote.zygote_path: keyed by address and version */
        if (shards > 0 || !*PODSHIM_VERSION || !zygote_wanted(zygote) ||
            snprintf(name, sizeof name, "%s//zygote-%s", f->address, PODSHIM_VERSION) >=
                (int)sizeof name)
            return -1;
        sha256_hex(name, strlen(name), hex);
        hex[40] = 0;
        if (join(name, sizeof name, run, "z") < 0 || join(zpath, sizeof zpath, name, hex) < 0)
            return -1;
        struct zygote_ask ask = {zpath, sock, f->namespace, f->id, f->address, cwd, f->debug};
        if (zygote_start(&ask) < 0) return -1;
    }
    snprintf(addr, sizeof addr, "unix://%s", sock);
    if (join(path, sizeof path, cwd, "address") < 0) return -1;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0) return -1;
    int bad = write_all(fd, addr, strlen(addr));
    if (close(fd) < 0 || bad) return -1;
    signal(SIGPIPE, SIG_IGN); /* as Python: a closed stdout is an error, not a signal */
    return write_all(1, addr, strlen(addr)) < 0 ? 1 : 0;
}

/* ---- delete ----------------------------------------------------------------------- */

static size_t put_varint(unsigned char *out, uint64_t v) {
    size_t n = 0;
    do {
        out[n] = v & 0x7f;
        v >>= 7;
        if (v) out[n] |= 0x80;
        n++;
    } while (v);
    return n;
}

/* delete.py's _read_pid: int(init.pid), 0 when missing or not a number; -1: ask Python. */
static long long read_pid(const char *bundle) {
    char path[PATH_MAX], *text, *p;
    size_t len;
    int err, digits = 0;
    long long pid = 0;
    if (join(path, sizeof path, bundle, "init.pid") < 0) return -1;
    if (!(text = slurp(path, &len, &err))) return err == ENOMEM ? -1 : 0;
    for (p = text; *p && strchr(" \t\n\r\v\f", *p); p++) {}
    for (; *p >= '0' && *p <= '9' && digits < 18; p++, digits++) pid = pid * 10 + (*p - '0');
    for (; *p && strchr(" \t\n\r\v\f", *p); p++) {}
    if (*p || (size_t)(p - text) != len) pid = -1; /* a sign, "_", a NUL...: Python decides */
    free(text);
    return pid;
}

static int delete(const struct flags *f) {
    char cwd[PATH_MAX], path[PATH_MAX];
    const char *bundle = f->bundle;
    struct stat st;
    unsigned char ts[24], out[64];
    size_t nts = 0, n = 0;
    struct timespec now;
    if (!*bundle && !(bundle = getcwd(cwd, sizeof cwd))) return -1;
    if (join(path, sizeof path, bundle, "podshim-deleted") < 0 || stat(path, &st) < 0) return -1;
    if (join(path, sizeof path, bundle, "panic.log") < 0 || stat(path, &st) == 0 ||
        errno != ENOENT)
        return -1;
    long long pid = read_pid(bundle);
    if (pid < 0 || clock_gettime(CLOCK_REALTIME, &now) < 0) return -1;
    /* delete.py's encode_delete_response(pid, 128 + 9, now) */
    if (now.tv_sec) ts[nts++] = 0x08, nts += put_varint(ts + nts, (uint64_t)now.tv_sec);
    if (now.tv_nsec) ts[nts++] = 0x10, nts += put_varint(ts + nts, (uint64_t)now.tv_nsec);
    if (pid) out[n++] = 0x08, n += put_varint(out + n, (uint64_t)pid);
    out[n++] = 0x10, n += put_varint(out + n, 128 + 9);
    out[n++] = 0x1a, n += put_varint(out + n, nts);
    memcpy(out + n, ts, nts);
    signal(SIGPIPE, SIG_IGN);
    return write_all(1, (const char *)out, n + nts) < 0 ? 1 : 0;
}

int main(int argc, char **argv) {
    static char opts[MAX_OPTIONS];
    ssize_t opts_len = -1; /* -1: stdin untouched */
    struct flags f;
    if (argc < 1) return 1;
    if (parse_flags(argc, argv, &f) == 0 && !f.version) {
        if (strcmp(f.action, "start") == 0) {
            ssize_t r = 0;
            if (!isatty(0)) { /* start.py: no options from a terminal, b"" on an error */
                do r = read(0, opts, sizeof opts);
                while (r < 0 && errno == EINTR);
            }
            if (start(&f, opts, r > 0 ? (size_t)r : 0) == 0) return 0;
            opts_len = r > 0 ? r : -1; /* at EOF or on an error Python reads the same */
        } else if (strcmp(f.action, "delete") == 0 && delete(&f) == 0) {
            return 0;
        }
    }
    run_python(argv, opts, opts_len);
    return 1;
}
