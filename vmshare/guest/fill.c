/*
 * fill: the vmshare test guest's memory filler (static, runs as the guest's workload).
 *
 * It maps private anonymous memory and fills four regions whose cross-guest
 * sharing is known in advance:
 *
 *   identical  page i is a function of (seed, i) only: every guest booted with
 *              the same seed holds the same pages, and no two pages of the
 *              region are equal (the page index is part of the page).
 *   unique     like identical, but the stream seed comes from /dev/urandom, so
 *              no page equals a page of any other guest or region.
 *   zero       pages written with zeros: resident in the guest, all-zero.
 *   volatile   unique content plus a counter rewritten every ~200 ms, so KSM
 *              sees their checksum change between scans.
 *
 * Page layout (64-bit little-endian words), shared with vmshare/guest/pattern.py:
 *   word 0  the bytes "VMSHARE" then the region code ('I', 'U', 'V')
 *   word 1  page index inside the region
 *   word 2  stream seed (the boot seed for identical, a random one otherwise)
 *   word 3  0, or the rewrite counter for volatile pages
 *   word j  (4..511) mix64(key + j * GOLDEN), key = mix64(mix64(seed + code * GOLDEN) ^ index)
 *
 * Usage:
 *   fill IDENTICAL_MIB UNIQUE_MIB ZERO_MIB VOLATILE_MIB SEED   fill, print, stay alive
 *   fill -p REGION SEED INDEX                                 write one page to stdout
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / 8u)
#define PAGES_PER_MIB 256u
#define MAX_MIB (1u << 20)
#define PAGE_MAGIC UINT64_C(0x0045524148534d56) /* "VMSHARE" + region code, in memory order */
#define GOLDEN UINT64_C(0x9e3779b97f4a7c15)
#define VOLATILE_PERIOD_NS 200000000L

static uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
	return z ^ (z >> 31);
}

static void fill_page(uint64_t *page, char code, uint64_t seed, uint64_t index)
{
	uint64_t key = mix64(mix64(seed + (uint64_t)(unsigned char)code * GOLDEN) ^ index);

	page[0] = PAGE_MAGIC | (uint64_t)(unsigned char)code << 56;
	page[1] = index;
	page[2] = seed;
	page[3] = 0;
	for (uint64_t j = 4; j < PAGE_WORDS; j++)
		page[j] = mix64(key + j * GOLDEN);
}

static void die(const char *what)
{
	printf("vmshare-fill: error %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static unsigned long parse_ulong(const char *text, const char *name, unsigned long max)
{
	char *end = NULL;
	unsigned long value;

	errno = 0;
	value = strtoul(text, &end, 10);
	if (errno != 0 || end == text || *end != '\0' || text[0] == '-' || value > max) {
		printf("vmshare-fill: error bad %s '%s' (an integer 0..%lu)\n", name, text, max);
		fflush(stdout);
		exit(2);
	}
	return value;
}

static uint64_t random_seed(void)
{
	uint64_t seed = 0;
	int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		die("open /dev/urandom");
	if (read(fd, &seed, sizeof(seed)) != (ssize_t)sizeof(seed))
		die("read /dev/urandom");
	close(fd);
	return seed;
}

static uint64_t *map_region(unsigned long mib)
{
	void *mem;

	if (mib == 0)
		return NULL;
	mem = mmap(NULL, (size_t)mib << 20, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	/* Keep the guest from backing the region with huge pages it might split later. */
	(void)madvise(mem, (size_t)mib << 20, MADV_NOHUGEPAGE);
	return mem;
}

static void fill_region(uint64_t *base, unsigned long mib, char code, uint64_t seed)
{
	for (uint64_t i = 0; i < (uint64_t)mib * PAGES_PER_MIB; i++)
		fill_page(base + i * PAGE_WORDS, code, seed, i);
}

static int dump_page(const char *region, const char *seed_text, const char *index_text)
{
	uint64_t page[PAGE_WORDS];
	uint64_t seed = strtoull(seed_text, NULL, 0);
	uint64_t index = strtoull(index_text, NULL, 0);

	if (strlen(region) != 1 || strchr("IUV", region[0]) == NULL) {
		fprintf(stderr, "fill: region must be I, U or V\n");
		return 2;
	}
	fill_page(page, region[0], seed, index);
	return fwrite(page, sizeof(page), 1, stdout) == 1 ? 0 : 1;
}

int main(int argc, char **argv)
{
	unsigned long identical, unique, zero, volatile_mib, seed;
	uint64_t *ident_mem, *unique_mem, *zero_mem, *volatile_mem;
	uint64_t counter = 0;
	struct timespec period = { 0, VOLATILE_PERIOD_NS };

	if (argc == 5 && strcmp(argv[1], "-p") == 0)
		return dump_page(argv[2], argv[3], argv[4]);
	if (argc != 6) {
		fprintf(stderr, "usage: fill IDENTICAL_MIB UNIQUE_MIB ZERO_MIB VOLATILE_MIB SEED\n"
				"       fill -p I|U|V SEED INDEX\n");
		return 2;
	}
	identical = parse_ulong(argv[1], "identical", MAX_MIB);
	unique = parse_ulong(argv[2], "unique", MAX_MIB);
	zero = parse_ulong(argv[3], "zero", MAX_MIB);
	volatile_mib = parse_ulong(argv[4], "volatile", MAX_MIB);
	seed = parse_ulong(argv[5], "seed", ULONG_MAX);

	ident_mem = map_region(identical);
	unique_mem = map_region(unique);
	zero_mem = map_region(zero);
	volatile_mem = map_region(volatile_mib);

	fill_region(ident_mem, identical, 'I', seed);
	fill_region(unique_mem, unique, 'U', random_seed());
	fill_region(volatile_mem, volatile_mib, 'V', random_seed());
	if (zero_mem != NULL) {
		/* Write, not just read: a read fault would map the shared zero page. */
		volatile uint64_t *z = zero_mem;

		for (size_t w = 0; w < ((size_t)zero << 20) / 8; w += PAGE_WORDS)
			z[w] = 0;
	}
	/* No swap in the guest, but keep the pages where they are anyway. */
	if (mlockall(MCL_CURRENT) != 0)
		printf("vmshare-fill: warning mlockall: %s\n", strerror(errno));

	printf("vmshare-fill: ready identical=%lu unique=%lu zero=%lu volatile=%lu\n",
	       identical, unique, zero, volatile_mib);
	fflush(stdout);

	for (;;) {
		nanosleep(&period, NULL);
		counter++;
		for (uint64_t i = 0; i < (uint64_t)volatile_mib * PAGES_PER_MIB; i++)
			((volatile uint64_t *)volatile_mem)[i * PAGE_WORDS + 3] = counter;
	}
}
