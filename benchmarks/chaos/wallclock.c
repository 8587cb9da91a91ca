/* Steps the wall clock of the processes it is preloaded into, and nothing
 * else: CLOCK_REALTIME (clock_gettime, gettimeofday, time) reads the real
 * clock plus an offset in seconds, a double at the start of the file named by
 * IVY_CHAOS_CLOCK_FILE, which the chaos harness rewrites to step the clock.
 * CLOCK_MONOTONIC stays real, as it does when NTP or an RTC steps a clock.
 * (libfaketime 0.9.10 with a real monotonic clock makes Python's time.sleep
 * fail with EINVAL, so the harness brings this instead.) */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile const double *offset_page;
static int (*real_clock_gettime)(clockid_t, struct timespec *);

static double offset_seconds(void) {
    if (!offset_page) {
        const char *path = getenv("IVY_CHAOS_CLOCK_FILE");
        int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
        void *page = fd >= 0 ? mmap(NULL, sizeof(double), PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
        if (fd >= 0) close(fd);
        static const double zero = 0.0;
        offset_page = page == MAP_FAILED ? &zero : (const double *)page;
    }
    return *offset_page;
}

static void shift(struct timespec *ts) {
    double offset = offset_seconds();
    long long nanoseconds = (long long)ts->tv_nsec + llround(fmod(offset, 1.0) * 1e9);
    ts->tv_sec += (time_t)offset + (time_t)(nanoseconds / 1000000000LL);
    nanoseconds %= 1000000000LL;
    if (nanoseconds < 0) { nanoseconds += 1000000000LL; ts->tv_sec -= 1; }
    ts->tv_nsec = (long)nanoseconds;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    if (!real_clock_gettime) real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    int result = real_clock_gettime(clock, ts);
    if (result == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) shift(ts);
    return result;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    if (tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
