/* The rate of this CPU's time stamp counter, in kHz, against CLOCK_MONOTONIC_RAW: the
 * median of five 50 ms windows. Under TCG a guest's TSC is the host's, so podshim gives
 * the guest this rate (tsc_early_khz=) instead of letting it calibrate against the
 * emulated PIT, which fails now and then and leaves the guest on a 4 ms jiffies clock.
 * Built and run by `podshim uvm prepare`; prints one number. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <x86intrin.h>

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC_RAW, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

int main(void)
{
	uint64_t khz[5];
	for (int i = 0; i < 5; i++) {
		struct timespec window = {0, 50000000};
		uint64_t t0 = now_ns(), c0 = __rdtsc();
		nanosleep(&window, NULL);
		uint64_t t1 = now_ns(), c1 = __rdtsc();
		if (t1 <= t0 || c1 <= c0)
			return 1;
		khz[i] = (c1 - c0) * 1000000u / (t1 - t0);
	}
	qsort(khz, 5, sizeof(khz[0]), cmp);
	printf("%llu\n", (unsigned long long)khz[2]);
	return 0;
}
