/* ferry-test/counter: a tiny stateful HTTP service for migration tests.
 *
 * State that a migration must keep:
 *  - `counter`, in memory, incremented every tick;
 *  - /data/ticks.log in the writable layer, kept open for append, one line per tick;
 *  - `nonce`, random at process start: equal before and after a move proves the
 *    same process (not a fresh start) answers.
 * GET any path -> {"counter":N,"lines":L,"nonce":"...","pid":P}
 * Single-threaded poll loop so CRIU sees a simple process.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long count_lines(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    char buf[65536];
    long n = 0;
    ssize_t r;
    while ((r = read(fd, buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < r; i++) n += buf[i] == '\n';
    close(fd);
    return n;
}

int main(void) {
    const char *log_path = "/data/ticks.log";
    double interval = 0.2;
    const char *iv = getenv("COUNTER_INTERVAL_MS");
    if (iv) interval = atoi(iv) / 1000.0;
    mkdir("/data", 0755);
    int logfd = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (logfd < 0) { perror("open log"); return 1; }

    unsigned long long nonce;
    int rfd = open("/dev/urandom", O_RDONLY);
    if (rfd < 0 || read(rfd, &nonce, sizeof nonce) != sizeof nonce) nonce = (unsigned long long)time(NULL) ^ getpid();
    if (rfd >= 0) close(rfd);

    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(8080), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 64) < 0) { perror("listen"); return 1; }
    printf("counter listening on :8080 nonce=%016llx\n", nonce);
    fflush(stdout);

    long counter = 0;
    double last = now();
    for (;;) {
        struct pollfd p = {.fd = ls, .events = POLLIN};
        int r = poll(&p, 1, 50);
        double t = now();
        /* The monotonic clock of another host may be behind ours after a move. */
        if (t < last) last = t;
        while (t - last >= interval) {
            counter++;
            char line[64];
            int n = snprintf(line, sizeof line, "tick %ld\n", counter);
            if (write(logfd, line, n) != n) perror("write log");
            last += interval;
        }
        if (r <= 0 || !(p.revents & POLLIN)) continue;
        int c = accept(ls, NULL, NULL);
        if (c < 0) continue;
        struct timeval tv = {.tv_sec = 1};
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char req[2048];
        size_t got = 0;
        while (got < sizeof req - 1) {
            ssize_t k = read(c, req + got, sizeof req - 1 - got);
            if (k <= 0) break;
            got += k;
            req[got] = 0;
            if (strstr(req, "\r\n\r\n")) break;
        }
        char body[256], resp[512];
        int bl = snprintf(body, sizeof body, "{\"counter\":%ld,\"lines\":%ld,\"nonce\":\"%016llx\",\"pid\":%d}\n",
                          counter, count_lines(log_path), nonce, getpid());
        int rl = snprintf(resp, sizeof resp,
                          "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
                          bl, body);
        if (write(c, resp, rl) < 0) perror("write resp");
        close(c);
    }
}
