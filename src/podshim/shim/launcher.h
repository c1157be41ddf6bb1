/* What launcher.c and launcher_zygote.c share (podshim's own code). */
#ifndef PODSHIM_LAUNCHER_H
#define PODSHIM_LAUNCHER_H

#include <stddef.h>

/* The SHA-256 of data[0:len] as 64 lowercase hex digits and a NUL (launcher_sha256.c). */
void sha256_hex(const char *data, size_t len, char out[65]);

/* A new pod's daemon, asked of the zygote (zygote.py's request fields). */
struct zygote_ask {
    const char *zygote;    /* the zygote's socket: <run>/z/<sha256(address)[:40]> */
    const char *socket;    /* the shim socket path to listen at */
    const char *namespace; /* containerd namespace */
    const char *id;
    const char *address;   /* containerd's address */
    const char *bundle;
    int debug;
};

/* zygote_start's answers besides 0 (the daemon is committed to serve); nothing is left
 * behind either way and Python's start does the work: */
#define ZYGOTE_NONE -1   /* no zygote listens (Python spawns one), or a file is in the way */
#define ZYGOTE_FAILED -2 /* the zygote did not serve in time or refused: not asked again */

/* Listen at ask->socket and have the zygote fork the daemon serving it. */
int zygote_start(const struct zygote_ask *ask);

#endif
