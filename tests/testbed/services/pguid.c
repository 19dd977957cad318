/* Testbed only: PostgreSQL refuses to run as root, but CRIU on the testbed can
 * dump only root's processes (no CAP_SYS_RESOURCE). Loaded with LD_PRELOAD, this
 * reports PG_FAKE_UID to getuid/geteuid so PostgreSQL's own checks pass while
 * the process stays root. Nothing else in the image uses it. */
#include <stdlib.h>
#include <unistd.h>

static uid_t fake(void) {
    const char *s = getenv("PG_FAKE_UID");
    return s ? (uid_t)strtoul(s, NULL, 10) : 0;
}

uid_t getuid(void) { return fake(); }
uid_t geteuid(void) { return fake(); }
