/* ferry-test/memhog: fills MEMHOG_MIB MiB with pseudo-random data and prints a
 * checksum of that memory every second. The checksum is recomputed from memory
 * each time, so an unchanged value after a move proves the pages came across. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    const char *e = getenv("MEMHOG_MIB");
    size_t mib = e ? strtoul(e, NULL, 10) : 64;
    size_t words = mib * 1024 * 1024 / sizeof(uint64_t);
    uint64_t *buf = malloc(words * sizeof(uint64_t));
    if (!buf) { perror("malloc"); return 1; }
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < words; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        buf[i] = x;
    }
    for (unsigned long iter = 0;; iter++) {
        uint64_t h = 1469598103934665603ULL;
        for (size_t i = 0; i < words; i++) h = (h ^ buf[i]) * 1099511628211ULL;
        printf("iter=%lu mib=%zu checksum=%016llx\n", iter, mib, (unsigned long long)h);
        fflush(stdout);
        sleep(1);
    }
}
