/*
 * repair_cycle: the C reference for sockrepair's benchmark. It times the TCP_REPAIR freeze-to-resume cycle
 * (read state, silent close, restore) written straight from the kernel UAPI (linux/tcp.h, linux/sockios.h), with
 * no library in between, so every figure of the Python engine can be given as a ratio to what C does on the same
 * machine in the same run.
 *
 * Every connection is a loopback pair this program makes itself; the socket that moves is the client end, the
 * accepted end is the peer that must not notice. After each cycle both directions are read to the last byte and
 * compared with the pattern that was written: a run that loses, duplicates or reorders a byte is reported as not
 * verified and exits 1.
 *
 *   repair_cycle [--sizes Q,Q,...] [--reps N] [--block B] [--batches K,K,...] [--batch-reps R] [--options] [--warm]
 *
 * Single mode: for each queue size Q, one connection with Q bytes in each queue goes through the cycle, N times
 * (sizes interleaved rep by rep; with --block B, in blocks of B consecutive cycles of one size, each block after an
 * untimed cycle of its size, as sockrepair's bench runs them). Batch mode: K connections are all checkpointed, then
 * all closed, then all restored; their peer ends live in a child process.
 *
 * The default cycle is the minimal one (what restore cannot do without), with queue buffers malloc'd afresh at
 * every checkpoint. --options (like-for-like) also reads before the freeze, and sets at restore, the application
 * socket options that sockrepair's engine keeps (sockrepair/engine/_sockopts.py), with the engine's rules for when
 * each is set. --warm keeps one pair of queue buffers across cycles, every page touched before any timed cycle,
 * which leaves the cost of TCP repair itself; a buffer of 1 MiB or more is a huge-page-aligned mapping advised
 * MADV_HUGEPAGE, as the engine's peek buffers are (sockrepair/engine/_pool.py), so that neither side's figure
 * gains from TLB reach the other lacks.
 *
 * Output: one JSON object on stdout with every sample in nanoseconds (the caller computes medians and p99).
 * Run it inside a throwaway network namespace: it needs CAP_NET_ADMIN and fills loopback ports.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SIOCOUTQNSD
#define SIOCOUTQNSD 0x894B
#endif
#ifndef TCP_REPAIR_WINDOW
#define TCP_REPAIR_WINDOW 29
#endif
/* TCP option kinds (RFC 793/7323/2018) and the ESTABLISHED state number: the kernel's UAPI headers do not export
 * them, and netinet/tcp.h cannot be included next to linux/tcp.h */
enum { OPT_MAXSEG = 2, OPT_WINDOW = 3, OPT_SACK_PERM = 4, OPT_TIMESTAMP = 8 };
enum { STATE_ESTABLISHED = 1 };

enum { PH_READ, PH_CLOSE, PH_RESTORE, N_PHASES };
static const char *const phase_names[N_PHASES] = {"read_state", "close", "restore"};

/* bytes each side writes after the cycle: proves the restored sequence numbers carry on, not just the queues */
#define TAIL_BYTES 4096
#define BATCH_PROBE 16
#define IO_TIMEOUT_MS 30000

/* SO_BINDTODEVICE and TCP_CONGESTION names, read into buffers of the engine's size (IFNAMSIZ) */
#define NAME_BYTES 16

static char err_msg[512];
static int opt_options, opt_warm, opt_block; /* --options, --warm, --block */

static int fail(const char *fmt, ...)
{
	int saved = errno;
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(err_msg, sizeof(err_msg), fmt, ap);
	va_end(ap);
	if (saved && n > 0 && (size_t)n < sizeof(err_msg))
		snprintf(err_msg + n, sizeof(err_msg) - n, ": %s", strerror(saved));
	errno = saved;
	return -1;
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- checkable byte streams: byte i of stream s is fixed, so any loss or reordering shows at its offset ---- */

static uint64_t splitmix64(uint64_t x)
{
	x += 0x9E3779B97F4A7C15ull;
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
	return x ^ (x >> 31);
}

static void pattern(uint64_t stream, uint64_t off, unsigned char *buf, size_t len)
{
	uint64_t key = splitmix64(stream);
	size_t i = 0;

	while (i < len && ((off + i) & 7)) { /* up to the next 8-byte boundary of the stream */
		uint64_t pos = off + i;
		buf[i++] = (unsigned char)(splitmix64(key ^ (pos >> 3)) >> (8 * (pos & 7)));
	}
	for (; i + 8 <= len; i += 8) { /* whole words; byte order is the same for writer and checker */
		uint64_t word = splitmix64(key ^ ((off + i) >> 3));
		memcpy(buf + i, &word, 8);
	}
	if (i < len) {
		uint64_t word = splitmix64(key ^ ((off + i) >> 3));
		memcpy(buf + i, &word, len - i);
	}
}

/* ---- the state a checkpoint takes: exactly what restore needs, as criu/libsoccr keep it ---- */

/* --options: the application options sockrepair's engine keeps for an IPv4 socket, in the order it reads them
 * (sockrepair/engine/_sockopts.py _READS), each with the engine's rule for setting it at restore */
enum when_set {
	SET_UNLESS_FRESH, /* in repair mode, unless it holds the value every new socket starts with */
	SET_ALWAYS,       /* in repair mode: a default that follows the host's sysctls travels as read */
	SET_PRE_BIND,     /* before bind and connect, when not 0: routing and binding read it */
	SET_AFTER_REPAIR, /* SO_REUSEADDR, when set: leaving repair mode clears it */
	SIZES_BUFFERS,    /* SO_SNDBUF/SO_RCVBUF: the floor of the buffers restore sizes */
};

struct app_opt {
	int level, opt;
	const char *name;
	enum when_set when;
	int fresh;
	int optional; /* Linux 6.15+: reads as 0 (not recorded, never set) where the kernel lacks it (ENOPROTOOPT) */
	int per_batch; /* a batch of BATCH_FRESH_FROM or more skips it when a new socket of the namespace holds the
			* value (the engine's restore_all: sockrepair/engine/_sockopts.py batch_fresh_values) */
};

/* the options of sockrepair's image version 2 (older headers lack some) */
#ifndef TCP_RTO_MAX_MS
#define TCP_RTO_MAX_MS 44
#endif
#ifndef TCP_RTO_MIN_US
#define TCP_RTO_MIN_US 45
#endif
#ifndef TCP_DELACK_MAX_US
#define TCP_DELACK_MAX_US 46
#endif
#ifndef SO_BUSY_POLL
#define SO_BUSY_POLL 46
#endif
#ifndef SO_MAX_PACING_RATE
#define SO_MAX_PACING_RATE 47
#endif

static const struct app_opt app_opts[] = {
	{IPPROTO_IP, IP_TOS, "IP_TOS", SET_UNLESS_FRESH, 0},
	{IPPROTO_IP, IP_TTL, "IP_TTL", SET_ALWAYS, 0},
	{IPPROTO_TCP, TCP_NODELAY, "TCP_NODELAY", SET_UNLESS_FRESH, 0},
	{SOL_SOCKET, SO_KEEPALIVE, "SO_KEEPALIVE", SET_UNLESS_FRESH, 0},
	{IPPROTO_TCP, TCP_KEEPIDLE, "TCP_KEEPIDLE", SET_ALWAYS, 0},
	{IPPROTO_TCP, TCP_KEEPINTVL, "TCP_KEEPINTVL", SET_ALWAYS, 0},
	{IPPROTO_TCP, TCP_KEEPCNT, "TCP_KEEPCNT", SET_ALWAYS, 0},
	{SOL_SOCKET, SO_REUSEPORT, "SO_REUSEPORT", SET_UNLESS_FRESH, 0},
	{SOL_SOCKET, SO_PRIORITY, "SO_PRIORITY", SET_ALWAYS, 0},
	{SOL_SOCKET, SO_RCVLOWAT, "SO_RCVLOWAT", SET_UNLESS_FRESH, 1},
	{IPPROTO_TCP, TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT", SET_UNLESS_FRESH, 0},
	{IPPROTO_TCP, TCP_NOTSENT_LOWAT, "TCP_NOTSENT_LOWAT", SET_UNLESS_FRESH, 0},
	{IPPROTO_TCP, TCP_CORK, "TCP_CORK", SET_UNLESS_FRESH, 0},
	{IPPROTO_IP, IP_MTU_DISCOVER, "IP_MTU_DISCOVER", SET_UNLESS_FRESH, -1, 0, 1},
	{SOL_SOCKET, SO_OOBINLINE, "SO_OOBINLINE", SET_UNLESS_FRESH, 0},
	{SOL_SOCKET, SO_BUSY_POLL, "SO_BUSY_POLL", SET_UNLESS_FRESH, 0},
	{SOL_SOCKET, SO_MAX_PACING_RATE, "SO_MAX_PACING_RATE", SET_UNLESS_FRESH, -1},
	{IPPROTO_TCP, TCP_LINGER2, "TCP_LINGER2", SET_UNLESS_FRESH, 0},
	{IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, "TCP_THIN_LINEAR_TIMEOUTS", SET_UNLESS_FRESH, 0},
	{IPPROTO_TCP, TCP_INQ, "TCP_INQ", SET_UNLESS_FRESH, 0},
	{IPPROTO_TCP, TCP_WINDOW_CLAMP, "TCP_WINDOW_CLAMP", SET_UNLESS_FRESH, 0},
	{IPPROTO_TCP, TCP_RTO_MAX_MS, "TCP_RTO_MAX_MS", SET_UNLESS_FRESH, 0, 1, 1},
	{IPPROTO_TCP, TCP_RTO_MIN_US, "TCP_RTO_MIN_US", SET_UNLESS_FRESH, 0, 1, 1},
	{IPPROTO_TCP, TCP_DELACK_MAX_US, "TCP_DELACK_MAX_US", SET_UNLESS_FRESH, 0, 1, 1},
	{SOL_SOCKET, SO_MARK, "SO_MARK", SET_PRE_BIND, 0},
	{IPPROTO_IP, IP_FREEBIND, "IP_FREEBIND", SET_PRE_BIND, 0},
	{SOL_SOCKET, SO_REUSEADDR, "SO_REUSEADDR", SET_AFTER_REPAIR, 0},
	{SOL_SOCKET, SO_SNDBUF, "SO_SNDBUF", SIZES_BUFFERS, 0},
	{SOL_SOCKET, SO_RCVBUF, "SO_RCVBUF", SIZES_BUFFERS, 0},
};
#define N_APP_OPTS (sizeof(app_opts) / sizeof(app_opts[0]))
enum { APP_SNDBUF = N_APP_OPTS - 2, APP_RCVBUF = N_APP_OPTS - 1 };
#define BATCH_FRESH_FROM 16
#define NOT_READ (-2) /* a value no option reads as: never equal */
/* what a new socket holds, for the per_batch options, while a batch of BATCH_FRESH_FROM or more restores */
static int batch_fresh_on;
static int batch_fresh[N_APP_OPTS];

struct app_state {
	int value[N_APP_OPTS];
	struct linger linger;
	struct timeval rcvtimeo, sndtimeo;
	char bindtodevice[NAME_BYTES + 1], congestion[NAME_BYTES + 1];
};

/* A queue's copy. Without --warm it is malloc'd at each checkpoint and freed after the cycle; with --warm it only
 * grows, and is touched when it does. `map`/`map_len`: the mapping behind a huge-page buffer (NULL for malloc). */
struct qbuf {
	unsigned char *data;
	size_t cap;
	void *map;
	size_t map_len;
};

#define HUGE_PAGE ((size_t)2 << 20)
#define HUGE_FROM ((size_t)1 << 20)

struct conn_state {
	struct sockaddr_in local, remote;
	uint32_t send_seq, recv_seq; /* sequence number at the END of each queue, as TCP_QUEUE_SEQ reports it */
	uint32_t outq_len, unsent_len, inq_len;
	uint32_t mss, timestamp;
	uint8_t options, snd_wscale, rcv_wscale;
	int sndbuf, rcvbuf;
	struct tcp_repair_window window;
	struct app_state app; /* --options only */
	struct qbuf outq, inq;
};

static int set_int(int fd, int level, int opt, int val, const char *what)
{
	if (setsockopt(fd, level, opt, &val, sizeof(val)) < 0)
		return fail("setsockopt(%s)", what);
	return 0;
}

static int get_int(int fd, int level, int opt, void *val, const char *what)
{
	socklen_t len = sizeof(int);
	if (getsockopt(fd, level, opt, val, &len) < 0)
		return fail("getsockopt(%s)", what);
	return 0;
}

static int ioctl_int(int fd, unsigned long req, uint32_t *val, const char *what)
{
	int v;
	if (ioctl(fd, req, &v) < 0)
		return fail("ioctl(%s)", what);
	*val = (uint32_t)v;
	return 0;
}

static void release(struct qbuf *b)
{
	if (b->map != NULL)
		munmap(b->map, b->map_len);
	else
		free(b->data);
	*b = (struct qbuf){NULL, 0, NULL, 0};
}

/* --warm, from HUGE_FROM bytes: a window on a huge-page boundary of a mapping one huge page longer, advised before
 * it is touched (touched first, its pages would be 4 KiB ones). */
static int reserve_huge(struct qbuf *b, size_t len, const char *what)
{
	size_t size = (len + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
	void *map = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (map == MAP_FAILED)
		return fail("mmap(%zu) for the %s", size + HUGE_PAGE, what);
	(void)madvise(map, size + HUGE_PAGE, MADV_HUGEPAGE); /* no THP in the kernel: 4 KiB pages serve as well */
	b->map = map;
	b->map_len = size + HUGE_PAGE;
	b->data = (unsigned char *)map + (HUGE_PAGE - (uintptr_t)map % HUGE_PAGE) % HUGE_PAGE;
	memset(b->data, 0, size);
	b->cap = size;
	return 0;
}

static int reserve(struct qbuf *b, size_t len, const char *what)
{
	if (len <= b->cap)
		return 0;
	release(b);
	if (opt_warm && len >= HUGE_FROM)
		return reserve_huge(b, len, what);
	b->data = malloc(len);
	if (b->data == NULL)
		return fail("malloc(%zu) for the %s", len, what);
	if (opt_warm)
		memset(b->data, 0, len);
	b->cap = len;
	return 0;
}

static int peek_queue(int fd, int queue, uint32_t *seq, struct qbuf *buf, uint32_t len, const char *what)
{
	if (set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE") < 0)
		return -1;
	if (get_int(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, seq, "TCP_QUEUE_SEQ") < 0)
		return -1;
	if (len == 0)
		return 0;
	if (reserve(buf, len, what) < 0)
		return -1;
	ssize_t got = recv(fd, buf->data, len, MSG_PEEK | MSG_DONTWAIT);
	if (got != (ssize_t)len)
		return got < 0 ? fail("recv(MSG_PEEK, %s)", what) : (errno = 0, fail("peeked %zd of %u bytes of the %s", got, len, what));
	return 0;
}

static int get_name(int fd, int level, int opt, char *name, const char *what)
{
	socklen_t len = NAME_BYTES;
	if (getsockopt(fd, level, opt, name, &len) < 0)
		return fail("getsockopt(%s)", what);
	name[len] = 0;
	return 0;
}

/* Before repair mode: it forces the reuse flag, which SO_REUSEADDR would then report. */
static int read_app_options(int fd, struct app_state *app)
{
	socklen_t len = sizeof(app->linger);

	for (size_t i = 0; i < N_APP_OPTS; i++)
		if (get_int(fd, app_opts[i].level, app_opts[i].opt, &app->value[i], app_opts[i].name) < 0) {
			if (!app_opts[i].optional || errno != ENOPROTOOPT)
				return -1;
			app->value[i] = 0;
		}
	if (getsockopt(fd, SOL_SOCKET, SO_LINGER, &app->linger, &len) < 0)
		return fail("getsockopt(SO_LINGER)");
	len = sizeof(app->rcvtimeo);
	if (getsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &app->rcvtimeo, &len) < 0)
		return fail("getsockopt(SO_RCVTIMEO)");
	len = sizeof(app->sndtimeo);
	if (getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &app->sndtimeo, &len) < 0)
		return fail("getsockopt(SO_SNDTIMEO)");
	return get_name(fd, SOL_SOCKET, SO_BINDTODEVICE, app->bindtodevice, "SO_BINDTODEVICE") < 0 ? -1
	       : get_name(fd, IPPROTO_TCP, TCP_CONGESTION, app->congestion, "TCP_CONGESTION");
}

static int checkpoint(int fd, struct conn_state *st)
{
	struct tcp_info ti;
	socklen_t len;
	struct qbuf outq = st->outq, inq = st->inq; /* kept: with --warm they outlive the cycle */

	memset(st, 0, sizeof(*st));
	st->outq = outq;
	st->inq = inq;
	if (opt_options && read_app_options(fd, &st->app) < 0)
		return -1;
	if (set_int(fd, IPPROTO_TCP, TCP_REPAIR, 1, "TCP_REPAIR on") < 0)
		return -1;
	len = sizeof(st->local);
	if (getsockname(fd, (struct sockaddr *)&st->local, &len) < 0)
		return fail("getsockname");
	len = sizeof(st->remote);
	if (getpeername(fd, (struct sockaddr *)&st->remote, &len) < 0)
		return fail("getpeername");
	len = sizeof(ti);
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
		return fail("getsockopt(TCP_INFO)");
	if (ti.tcpi_state != STATE_ESTABLISHED)
		return errno = 0, fail("socket is in TCP state %u, not ESTABLISHED", ti.tcpi_state);
	st->options = ti.tcpi_options;
	st->snd_wscale = ti.tcpi_snd_wscale;
	st->rcv_wscale = ti.tcpi_rcv_wscale;
	if (get_int(fd, IPPROTO_TCP, TCP_MAXSEG, &st->mss, "TCP_MAXSEG") < 0)
		return -1;
	if ((st->options & TCPI_OPT_TIMESTAMPS) &&
	    get_int(fd, IPPROTO_TCP, TCP_TIMESTAMP, &st->timestamp, "TCP_TIMESTAMP") < 0)
		return -1;
	len = sizeof(st->window);
	if (getsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, &st->window, &len) < 0)
		return fail("getsockopt(TCP_REPAIR_WINDOW)");
	if (opt_options) {
		st->sndbuf = st->app.value[APP_SNDBUF];
		st->rcvbuf = st->app.value[APP_RCVBUF];
	} else if (get_int(fd, SOL_SOCKET, SO_SNDBUF, &st->sndbuf, "SO_SNDBUF") < 0 ||
		   get_int(fd, SOL_SOCKET, SO_RCVBUF, &st->rcvbuf, "SO_RCVBUF") < 0) {
		return -1;
	}
	/* before any queue is selected: with the send queue selected an arriving ACK marks the whole queue sent */
	if (ioctl_int(fd, SIOCOUTQ, &st->outq_len, "SIOCOUTQ") < 0 ||
	    ioctl_int(fd, SIOCOUTQNSD, &st->unsent_len, "SIOCOUTQNSD") < 0 ||
	    ioctl_int(fd, SIOCINQ, &st->inq_len, "SIOCINQ") < 0)
		return -1;
	if (peek_queue(fd, TCP_RECV_QUEUE, &st->recv_seq, &st->inq, st->inq_len, "receive queue") < 0 ||
	    peek_queue(fd, TCP_SEND_QUEUE, &st->send_seq, &st->outq, st->outq_len, "send queue") < 0)
		return -1;
	return 0;
}

static void free_state(struct conn_state *st)
{
	release(&st->inq);
	release(&st->outq);
}

/* A repair-mode send appends to the selected queue; big writes can fail with ENOMEM, so the chunk shrinks. */
static int fill_queue(int fd, int queue, const unsigned char *buf, uint32_t len, const char *what)
{
	size_t chunk = len;
	uint32_t done = 0;

	if (len == 0)
		return 0;
	if (set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE") < 0)
		return -1;
	while (done < len) {
		size_t want = len - done < chunk ? len - done : chunk;
		ssize_t n = send(fd, buf + done, want, 0);
		if (n < 0) {
			if (errno == ENOMEM && chunk > 4096) {
				chunk /= 2;
				continue;
			}
			return fail("send(%s, %zu bytes in repair mode)", what, want);
		}
		done += n;
	}
	return 0;
}

static int set_name(int fd, int level, int opt, const char *name, const char *what)
{
	if (setsockopt(fd, level, opt, name, strlen(name)) < 0)
		return fail("setsockopt(%s=%s)", what, name);
	return 0;
}

static int apply_pre_bind(int fd, const struct app_state *app)
{
	for (size_t i = 0; i < N_APP_OPTS; i++)
		if (app_opts[i].when == SET_PRE_BIND && app->value[i] &&
		    set_int(fd, app_opts[i].level, app_opts[i].opt, app->value[i], app_opts[i].name) < 0)
			return -1;
	return app->bindtodevice[0] ? set_name(fd, SOL_SOCKET, SO_BINDTODEVICE, app->bindtodevice, "SO_BINDTODEVICE")
				    : 0;
}

/* The engine's sizing: at least what the socket had, and room for its queues at the kernel's charge of about twice
 * the payload; setsockopt doubles the value given, hence the halving. */
static int size_buffers_as_engine(int fd, const struct conn_state *st)
{
	int64_t snd = 2 * (int64_t)st->outq_len + (64 << 10), rcv = 2 * (int64_t)st->inq_len + (64 << 10);
	snd = snd > st->sndbuf ? snd : st->sndbuf;
	rcv = rcv > st->rcvbuf ? rcv : st->rcvbuf;
	if (set_int(fd, SOL_SOCKET, SO_SNDBUFFORCE, (int)(snd / 2), "SO_SNDBUFFORCE") < 0 ||
	    set_int(fd, SOL_SOCKET, SO_RCVBUFFORCE, (int)(rcv / 2), "SO_RCVBUFFORCE") < 0)
		return -1;
	return 0;
}

static int apply_in_repair(int fd, const struct app_state *app)
{
	for (size_t i = 0; i < N_APP_OPTS; i++) {
		const struct app_opt *o = &app_opts[i];
		/* as the engine's _apply_plan: the value every new socket has, or, in a batch, the one a new socket of the
		 * namespace holds (an optional option the kernel lacks reads 0 = o->fresh, and must never be set) */
		int fresh = app->value[i] == o->fresh ||
			    (batch_fresh_on && o->per_batch && app->value[i] == batch_fresh[i]);
		if ((o->when == SET_ALWAYS || (o->when == SET_UNLESS_FRESH && !fresh)) &&
		    set_int(fd, o->level, o->opt, app->value[i], o->name) < 0)
			return -1;
	}
	if ((app->linger.l_onoff || app->linger.l_linger) &&
	    setsockopt(fd, SOL_SOCKET, SO_LINGER, &app->linger, sizeof(app->linger)) < 0)
		return fail("setsockopt(SO_LINGER)");
	if ((app->rcvtimeo.tv_sec || app->rcvtimeo.tv_usec) &&
	    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &app->rcvtimeo, sizeof(app->rcvtimeo)) < 0)
		return fail("setsockopt(SO_RCVTIMEO)");
	if ((app->sndtimeo.tv_sec || app->sndtimeo.tv_usec) &&
	    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &app->sndtimeo, sizeof(app->sndtimeo)) < 0)
		return fail("setsockopt(SO_SNDTIMEO)");
	return app->congestion[0] ? set_name(fd, IPPROTO_TCP, TCP_CONGESTION, app->congestion, "TCP_CONGESTION") : 0;
}

/* The per_batch options of a new socket, into `into` (NOT_READ where the kernel lacks one), as restore_all reads
 * them at the start and again at the end of its batch. */
static int read_batch_fresh(int into[N_APP_OPTS])
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return fail("socket(fresh values)");
	for (size_t i = 0; i < N_APP_OPTS; i++) {
		socklen_t len = sizeof(int);
		into[i] = NOT_READ;
		if (app_opts[i].per_batch && getsockopt(fd, app_opts[i].level, app_opts[i].opt, &into[i], &len) < 0)
			into[i] = NOT_READ;
	}
	close(fd);
	return 0;
}

static int apply_after_repair(int fd, const struct app_state *app)
{
	for (size_t i = 0; i < N_APP_OPTS; i++)
		if (app_opts[i].when == SET_AFTER_REPAIR && app->value[i] &&
		    set_int(fd, app_opts[i].level, app_opts[i].opt, 1, app_opts[i].name) < 0)
			return -1;
	return 0;
}

/* Untimed, after restore: the socket reads back what was saved (its buffers excepted: restore sized them anew), so
 * --options is seen to have done its work. */
static int check_app_options(int fd, const struct app_state *saved)
{
	struct app_state now;

	if (read_app_options(fd, &now) < 0)
		return -1;
	for (size_t i = 0; i < N_APP_OPTS; i++)
		if (app_opts[i].when != SIZES_BUFFERS && now.value[i] != saved->value[i])
			return errno = 0, fail("%s is %d after restore, was %d", app_opts[i].name, now.value[i],
					       saved->value[i]);
	if (now.linger.l_onoff != saved->linger.l_onoff || now.linger.l_linger != saved->linger.l_linger)
		return errno = 0, fail("SO_LINGER changed across restore");
	if (memcmp(&now.rcvtimeo, &saved->rcvtimeo, sizeof(now.rcvtimeo)) ||
	    memcmp(&now.sndtimeo, &saved->sndtimeo, sizeof(now.sndtimeo)))
		return errno = 0, fail("SO_RCVTIMEO or SO_SNDTIMEO changed across restore");
	if (strcmp(now.bindtodevice, saved->bindtodevice) || strcmp(now.congestion, saved->congestion))
		return errno = 0, fail("SO_BINDTODEVICE or TCP_CONGESTION changed across restore (%s, %s -> %s, %s)",
				       saved->bindtodevice, saved->congestion, now.bindtodevice, now.congestion);
	return 0;
}

static int restore(const struct conn_state *st)
{
	struct tcp_repair_opt opts[4];
	int nopts = 0;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	const unsigned char *outq = st->outq.data;

	if (fd < 0)
		return fail("socket");
	if (set_int(fd, IPPROTO_TCP, TCP_REPAIR, 1, "TCP_REPAIR on") < 0)
		goto bad;
	if (opt_options) {
		if (apply_pre_bind(fd, &st->app) < 0 || size_buffers_as_engine(fd, st) < 0)
			goto bad;
	} else if ((st->inq_len || st->outq_len) && /* the kernel doubles what is set: the room the queues had */
		   (set_int(fd, SOL_SOCKET, SO_SNDBUFFORCE, st->sndbuf / 2, "SO_SNDBUFFORCE") < 0 ||
		    set_int(fd, SOL_SOCKET, SO_RCVBUFFORCE, st->rcvbuf / 2, "SO_RCVBUFFORCE") < 0)) {
		goto bad;
	}
	if (bind(fd, (const struct sockaddr *)&st->local, sizeof(st->local)) < 0) {
		fail("bind");
		goto bad;
	}
	/* only while closed and empty: the sequence of each queue's FIRST byte, then the bytes themselves */
	if (set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE") < 0 ||
	    set_int(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, (int)(st->recv_seq - st->inq_len), "TCP_QUEUE_SEQ recv") < 0 ||
	    set_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE") < 0 ||
	    set_int(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, (int)(st->send_seq - st->outq_len), "TCP_QUEUE_SEQ send") < 0)
		goto bad;
	if (connect(fd, (const struct sockaddr *)&st->remote, sizeof(st->remote)) < 0) {
		fail("connect in repair mode");
		goto bad;
	}
	opts[nopts++] = (struct tcp_repair_opt){OPT_MAXSEG, st->mss};
	if (st->options & TCPI_OPT_WSCALE)
		opts[nopts++] = (struct tcp_repair_opt){OPT_WINDOW, st->snd_wscale | (uint32_t)st->rcv_wscale << 16};
	if (st->options & TCPI_OPT_SACK)
		opts[nopts++] = (struct tcp_repair_opt){OPT_SACK_PERM, 0};
	if (st->options & TCPI_OPT_TIMESTAMPS)
		opts[nopts++] = (struct tcp_repair_opt){OPT_TIMESTAMP, 0};
	if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_OPTIONS, opts, nopts * sizeof(opts[0])) < 0) {
		fail("setsockopt(TCP_REPAIR_OPTIONS)");
		goto bad;
	}
	if ((st->options & TCPI_OPT_TIMESTAMPS) &&
	    set_int(fd, IPPROTO_TCP, TCP_TIMESTAMP, (int)st->timestamp, "TCP_TIMESTAMP") < 0)
		goto bad;
	if (fill_queue(fd, TCP_RECV_QUEUE, st->inq.data, st->inq_len, "receive queue") < 0 ||
	    fill_queue(fd, TCP_SEND_QUEUE, outq, st->outq_len - st->unsent_len, "unacked send queue") < 0)
		goto bad;
	/* the window goes in while still in repair mode: never-sent bytes written before it have hung connections */
	if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, &st->window, sizeof(st->window)) < 0) {
		fail("setsockopt(TCP_REPAIR_WINDOW)");
		goto bad;
	}
	/* still in repair mode, as the engine does: cork and nodelay must hold before the never-sent bytes go */
	if (opt_options && apply_in_repair(fd, &st->app) < 0)
		goto bad;
	if (set_int(fd, IPPROTO_TCP, TCP_REPAIR, 0, "TCP_REPAIR off") < 0)
		goto bad;
	/* bytes the peer never saw leave at once when written after repair; in repair mode they would wait an RTO */
	for (uint32_t done = st->outq_len - st->unsent_len; done < st->outq_len;) {
		ssize_t n = send(fd, outq + done, st->outq_len - done, MSG_DONTWAIT);
		if (n < 0) {
			fail("send(never-sent part, %u bytes left)", st->outq_len - done);
			goto bad;
		}
		done += n;
	}
	if (opt_options && apply_after_repair(fd, &st->app) < 0)
		goto bad;
	return fd;
bad:;
	int saved = errno;
	int on = 1;
	/* leave silently: the half-made socket must not reset the peer's connection */
	setsockopt(fd, IPPROTO_TCP, TCP_REPAIR, &on, sizeof(on));
	close(fd);
	errno = saved;
	return -1;
}

/* ---- connection set-up and verification (untimed) ---- */

static int listener_open(int rcvbuf)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return fail("socket(listener)");
	if ((rcvbuf && set_int(fd, SOL_SOCKET, SO_RCVBUF, rcvbuf, "SO_RCVBUF") < 0) ||
	    bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 4096) < 0) {
		fail("listener");
		close(fd);
		return -1;
	}
	return fd;
}

/* buffers are sized before the handshake so that window scaling fits them */
static int client_connect(int lfd, int client_buf)
{
	struct sockaddr_in a;
	socklen_t len = sizeof(a);
	int fd;

	if (getsockname(lfd, (struct sockaddr *)&a, &len) < 0)
		return fail("getsockname(listener)");
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return fail("socket(client)");
	if ((client_buf && (set_int(fd, SOL_SOCKET, SO_RCVBUFFORCE, client_buf, "SO_RCVBUFFORCE") < 0 ||
			    set_int(fd, SOL_SOCKET, SO_SNDBUFFORCE, client_buf, "SO_SNDBUFFORCE") < 0)) ||
	    connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		fail("connect(client)");
		close(fd);
		return -1;
	}
	return fd;
}

/* client end first (the one that moves), accepted end second (the peer) */
static int pair_open(int lfd, int client_buf, int pair[2])
{
	pair[0] = client_connect(lfd, client_buf);
	if (pair[0] < 0)
		return -1;
	pair[1] = accept(lfd, NULL, NULL);
	if (pair[1] < 0) {
		fail("accept");
		close(pair[0]);
		return -1;
	}
	return 0;
}

/* teardown with RST: thousands of cycles must not leave TIME_WAIT sockets holding loopback ports */
static void close_abort(int fd)
{
	struct linger l = {1, 0};
	if (fd < 0)
		return;
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
	close(fd);
}

static int wait_fd(int fd, short events)
{
	struct pollfd p = {.fd = fd, .events = events};
	int r = poll(&p, 1, IO_TIMEOUT_MS);
	if (r < 0)
		return fail("poll");
	if (r == 0)
		return errno = 0, fail("no progress for %d ms", IO_TIMEOUT_MS);
	return 0;
}

/* Write bytes [off, off+len) of a stream without ever blocking on a full window. */
static int write_stream(int fd, uint64_t stream, uint64_t off, uint64_t len)
{
	static unsigned char buf[1 << 16];
	while (len) {
		size_t n = len < sizeof(buf) ? len : sizeof(buf);
		pattern(stream, off, buf, n);
		ssize_t w = send(fd, buf, n, MSG_DONTWAIT);
		if (w < 0) {
			if (errno != EAGAIN)
				return fail("send");
			if (wait_fd(fd, POLLOUT) < 0)
				return -1;
			continue;
		}
		off += w;
		len -= w;
	}
	return 0;
}

struct reader {
	int fd;
	uint64_t stream, got, want;
};

static int read_some(struct reader *r)
{
	static unsigned char buf[1 << 16], ref[1 << 16];
	uint64_t left = r->want - r->got;
	ssize_t n = recv(r->fd, buf, left < sizeof(buf) ? left : sizeof(buf), MSG_DONTWAIT);
	if (n < 0)
		return errno == EAGAIN ? 0 : fail("recv while verifying");
	if (n == 0)
		return errno = 0, fail("EOF after %lu of %lu bytes", (unsigned long)r->got, (unsigned long)r->want);
	pattern(r->stream, r->got, ref, n);
	if (memcmp(buf, ref, n) != 0) {
		ssize_t i = 0;
		while (buf[i] == ref[i])
			i++;
		return errno = 0, fail("stream %lu: wrong byte at offset %lu", (unsigned long)r->stream,
				       (unsigned long)(r->got + i));
	}
	r->got += n;
	return 0;
}

/* Read both directions to the end, each compared byte for byte with the pattern that was written. */
static int read_both(struct reader *a, struct reader *b)
{
	while (a->got < a->want || b->got < b->want) {
		struct pollfd p[2] = {{.fd = a->fd, .events = POLLIN}, {.fd = b->fd, .events = POLLIN}};
		int r = poll(p, 2, IO_TIMEOUT_MS);
		if (r < 0)
			return fail("poll");
		if (r == 0)
			return errno = 0, fail("verify stalled: %lu of %lu and %lu of %lu bytes", (unsigned long)a->got,
					       (unsigned long)a->want, (unsigned long)b->got, (unsigned long)b->want);
		if ((p[0].revents && a->got < a->want && read_some(a) < 0) ||
		    (p[1].revents && b->got < b->want && read_some(b) < 0))
			return -1;
	}
	return 0;
}

static int queue_sizes(int fd, uint32_t *outq, uint32_t *unsent)
{
	return ioctl_int(fd, SIOCOUTQ, outq, "SIOCOUTQ") < 0 ? -1 : ioctl_int(fd, SIOCOUTQNSD, unsent, "SIOCOUTQNSD");
}

/* A delayed ACK would leave the sender guessing for up to 40 ms whether the window moved: TCP_QUICKACK sends any
 * pending ACK now, and on loopback it is processed before the call returns. */
static int ack_now(int fd)
{
	return set_int(fd, IPPROTO_TCP, TCP_QUICKACK, 1, "TCP_QUICKACK");
}

/* The send queue is wanted full of bytes the peer never took: first fill the peer's (small) receive buffer until
 * its window is closed and every byte sent is acknowledged, then write q more. No write is larger than what the
 * window still takes: a remainder smaller than the segment waiting for it would stay unsent until the zero-window
 * probe timer sends it an RTO later, maybe in the middle of a cycle (bench_engine.py _fill_send_queue measured it).
 * What is queued is measured again at checkpoint, not assumed. */
static int fill_send_queue(int fd, int peer, uint64_t stream, uint32_t q, uint64_t *written)
{
	uint32_t outq = 0, unsent = 0;
	uint64_t off = 0;
	int64_t deadline = now_ns() + (int64_t)IO_TIMEOUT_MS * 1000000;

	if (q == 0)
		return 0;
	if (set_int(fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY") < 0)
		return -1;
	for (;;) {
		struct tcp_info ti;
		socklen_t len = sizeof(ti);

		if (ack_now(peer) < 0 || queue_sizes(fd, &outq, &unsent) < 0)
			return -1;
		if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
			return fail("getsockopt(TCP_INFO)");
		if (len < offsetof(struct tcp_info, tcpi_snd_wnd) + sizeof(ti.tcpi_snd_wnd))
			return errno = 0, fail("this kernel's TCP_INFO has no tcpi_snd_wnd (Linux 5.4+)");
		int64_t room = (int64_t)ti.tcpi_snd_wnd - outq;
		if (unsent == 0 && room > 0) {
			uint32_t step = room < (1 << 16) ? (uint32_t)room : (1u << 16);
			if (off > (64u << 20))
				return errno = 0, fail("the peer's window never closed");
			if (write_stream(fd, stream, off, step) < 0)
				return -1;
			off += step;
		} else if (unsent == 0 && outq == 0) {
			break;
		} else if (now_ns() > deadline) {
			return errno = 0, fail("the peer left %u bytes unacknowledged", outq - unsent);
		} else {
			usleep(50);
		}
	}
	if (write_stream(fd, stream, off, q) < 0)
		return -1;
	*written = off + q;
	return 0;
}

/* The peer sends q bytes the socket does not read; wait until all of them sit in its receive queue. */
static int fill_recv_queue(int peer, int sock, uint64_t stream, uint32_t q)
{
	uint32_t inq = 0, off = 0;
	int64_t deadline = now_ns() + (int64_t)IO_TIMEOUT_MS * 1000000;

	while (inq < q) {
		/* no more than the window takes at once, so the peer's writes never wait on a delayed ACK */
		ssize_t n = 0;
		if (off < q) {
			uint32_t len = q - off < (1u << 16) ? q - off : (1u << 16);
			static unsigned char buf[1 << 16];
			pattern(stream, off, buf, len);
			n = send(peer, buf, len, MSG_DONTWAIT);
			if (n < 0 && errno != EAGAIN)
				return fail("send");
			off += n > 0 ? n : 0;
		}
		if (ack_now(sock) < 0 || ioctl_int(sock, SIOCINQ, &inq, "SIOCINQ") < 0)
			return -1;
		if (now_ns() > deadline)
			return errno = 0, fail("only %u of %u bytes reached the receive queue", inq, q);
		if (n <= 0 && inq < q)
			usleep(50);
	}
	return 0;
}

/* ---- single-connection mode ---- */

struct single_result {
	uint32_t queue;
	int reps, done, verified;
	uint32_t min_inq, min_outq;
	int64_t *samples; /* reps x N_PHASES */
	char error[512];
};

/* One cycle on a fresh pair; times[] gets the phases when `times` is given. Returns 0 when every byte arrived.
 * `st` is the caller's, so that with --warm its queue buffers serve every cycle. */
static int single_cycle(uint32_t q, uint64_t salt, int64_t *times, struct single_result *res, struct conn_state *st)
{
	int lfd, pair[2] = {-1, -1}, fd = -1, rc = -1;
	uint32_t outq_len = 0, inq_len = 0;
	uint64_t sent_by_sock = 0;
	/* room for q in each queue plus what the kernel charges per skb */
	int client_buf = q ? (int)(2 * (uint64_t)q + (1 << 20)) : 0;

	lfd = listener_open(q ? 65536 : 0);
	if (lfd < 0)
		return -1;
	if (pair_open(lfd, client_buf, pair) < 0)
		goto out;
	close(lfd);
	lfd = -1;
	if (fill_recv_queue(pair[1], pair[0], salt * 2 + 1, q) < 0 ||
	    fill_send_queue(pair[0], pair[1], salt * 2, q, &sent_by_sock) < 0)
		goto out;
	/* --warm: buffers big enough for this cycle's queues are in place, and touched, before the clock starts */
	if (opt_warm && (ioctl_int(pair[0], SIOCOUTQ, &outq_len, "SIOCOUTQ") < 0 ||
			 ioctl_int(pair[0], SIOCINQ, &inq_len, "SIOCINQ") < 0 ||
			 reserve(&st->outq, outq_len, "send queue") < 0 ||
			 reserve(&st->inq, inq_len, "receive queue") < 0))
		goto out;

	int64_t t0 = now_ns();
	if (checkpoint(pair[0], st) < 0)
		goto out;
	int64_t t1 = now_ns();
	close(pair[0]);
	pair[0] = -1;
	int64_t t2 = now_ns();
	fd = restore(st);
	int64_t t3 = now_ns();
	if (fd < 0)
		goto out;
	if (times) {
		times[PH_READ] = t1 - t0;
		times[PH_CLOSE] = t2 - t1;
		times[PH_RESTORE] = t3 - t2;
	}
	if (st->inq_len < res->min_inq)
		res->min_inq = st->inq_len;
	if (st->outq_len < res->min_outq)
		res->min_outq = st->outq_len;
	if (opt_options && check_app_options(fd, &st->app) < 0)
		goto out;

	struct reader at_sock = {fd, salt * 2 + 1, 0, (uint64_t)q + TAIL_BYTES};
	struct reader at_peer = {pair[1], salt * 2, 0, sent_by_sock + TAIL_BYTES};
	if (write_stream(pair[1], salt * 2 + 1, q, TAIL_BYTES) < 0 ||
	    write_stream(fd, salt * 2, sent_by_sock, TAIL_BYTES) < 0 || read_both(&at_sock, &at_peer) < 0)
		goto out;
	rc = 0;
out:
	if (!opt_warm)
		free_state(st);
	if (lfd >= 0)
		close(lfd);
	close_abort(pair[0]);
	close_abort(pair[1]);
	close_abort(fd);
	return rc;
}

static void run_single(struct single_result *res, int nsizes, int reps)
{
	uint64_t salt = 1;
	struct conn_state st = {0};

	for (int i = 0; i < nsizes; i++) {
		res[i].reps = reps;
		res[i].verified = 1;
		res[i].min_inq = res[i].min_outq = UINT32_MAX;
		res[i].samples = calloc((size_t)reps * N_PHASES, sizeof(int64_t));
		if (res[i].samples == NULL) {
			fprintf(stderr, "repair_cycle: out of memory\n");
			exit(2);
		}
		/* one untimed warm-up cycle: first-touch page faults and cold caches are not the cycle's cost */
		if (single_cycle(res[i].queue, salt++, NULL, &res[i], &st) < 0) {
			res[i].verified = 0;
			snprintf(res[i].error, sizeof(res[i].error), "%s", err_msg);
		}
	}
	/* Sizes interleaved, so drift in the machine's load touches every size alike: rep by rep, or block by block.
	 * A block starts with an untimed cycle of its size, so that no timed cycle follows one of another size, whose
	 * megabytes (filled, peeked, verified) would have evicted this size's working set from the caches. */
	int step = opt_block ? opt_block : 1;
	for (int rep = 0; rep < reps; rep += step)
		for (int i = 0; i < nsizes; i++) {
			int n = reps - rep < step ? reps - rep : step;
			if (opt_block && res[i].verified && single_cycle(res[i].queue, salt++, NULL, &res[i], &st) < 0) {
				res[i].verified = 0;
				snprintf(res[i].error, sizeof(res[i].error), "%s", err_msg);
			}
			for (int k = 0; k < n && res[i].verified; k++) {
				if (single_cycle(res[i].queue, salt++, res[i].samples + (size_t)res[i].done * N_PHASES,
						 &res[i], &st) < 0) {
					res[i].verified = 0;
					snprintf(res[i].error, sizeof(res[i].error), "%s", err_msg);
					break;
				}
				res[i].done++;
			}
		}
	free_state(&st);
}

/* ---- batch mode: K connections checkpointed, closed, then restored ---- */

struct batch_result {
	int connections, reps, done, verified;
	int64_t *samples; /* reps x N_PHASES */
	char error[512];
};

/* The peer ends live in a child process: a peer is another process anyway, and two fds per connection in one
 * process would not fit the 20,000-fd hard limit that a root without CAP_SYS_RESOURCE may be stuck with. The two
 * talk over pipes with fixed-size messages: a tag and, for an error, its text. */
struct peer_msg {
	char tag; /* 'A' all accepted, 'R' restored (go on), 'V' verified, 'E' error */
	char text[sizeof(err_msg)];
};

static int msg_send(int fd, char tag, const char *text)
{
	struct peer_msg m = {.tag = tag};
	snprintf(m.text, sizeof(m.text), "%s", text ? text : "");
	return write(fd, &m, sizeof(m)) == (ssize_t)sizeof(m) ? 0 : fail("write(pipe)");
}

static int msg_expect(int fd, char tag)
{
	struct peer_msg m;
	ssize_t n = read(fd, &m, sizeof(m));
	if (n != (ssize_t)sizeof(m))
		return n < 0 ? fail("read(pipe)") : (errno = 0, fail("the peer process went away"));
	if (m.tag == 'E')
		return errno = 0, fail("peer: %s", m.text);
	if (m.tag != tag)
		return errno = 0, fail("peer said '%c', expected '%c'", m.tag, tag);
	return 0;
}

/* each connection's probe bytes come from streams keyed by the moving end's port, so a mix-up shows */
static uint64_t probe_stream(uint64_t salt, const struct sockaddr_in *moving_end)
{
	return (salt << 20) + 2 * (uint64_t)ntohs(moving_end->sin_port);
}

static int probe_exchange(const int *fds, int k, uint64_t salt, int moving)
{
	for (int i = 0; i < k; i++) {
		struct sockaddr_in a;
		socklen_t len = sizeof(a);
		int got = moving ? getsockname(fds[i], (struct sockaddr *)&a, &len)
				 : getpeername(fds[i], (struct sockaddr *)&a, &len);
		if (got < 0 || write_stream(fds[i], probe_stream(salt, &a) + !moving, 0, BATCH_PROBE) < 0)
			return got < 0 ? fail("getsockname") : -1;
	}
	for (int i = 0; i < k; i++) {
		struct sockaddr_in a;
		socklen_t len = sizeof(a);
		if (moving ? getsockname(fds[i], (struct sockaddr *)&a, &len) : getpeername(fds[i], (struct sockaddr *)&a, &len))
			return fail("getsockname");
		struct reader r = {fds[i], probe_stream(salt, &a) + moving, 0, BATCH_PROBE};
		while (r.got < r.want)
			if (wait_fd(r.fd, POLLIN) < 0 || read_some(&r) < 0) {
				char what[sizeof(err_msg)];
				snprintf(what, sizeof(what), "%s", err_msg);
				errno = 0;
				return fail("connection %d of %d: %s", i, k, what);
			}
	}
	return 0;
}

static void batch_peer(int lfd, int k, uint64_t salt, int up, int down)
{
	int *peer = malloc(k * sizeof(int)), n = 0, ok = 0;
	char eof;

	if (peer == NULL) {
		errno = ENOMEM;
		fail("peer fds");
		goto report;
	}
	for (; n < k; n++)
		if ((peer[n] = accept(lfd, NULL, NULL)) < 0) {
			fail("accept");
			goto report;
		}
	close(lfd);
	if (msg_send(up, 'A', NULL) < 0 || msg_expect(down, 'R') < 0 || probe_exchange(peer, k, salt, 0) < 0)
		goto report;
	ok = 1;
report:
	msg_send(up, ok ? 'V' : 'E', ok ? NULL : err_msg);
	/* the connections stay up until the moving side has read its bytes and closes the pipe */
	while (read(down, &eof, 1) > 0)
		;
	for (int i = 0; i < n; i++)
		close_abort(peer[i]);
	_exit(0);
}

static int batch_cycle(int k, uint64_t salt, int64_t *times)
{
	int lfd = -1, rc = -1, made = 0, up[2] = {-1, -1}, down[2] = {-1, -1};
	pid_t child = -1;
	int *sock = malloc(k * sizeof(int));
	struct conn_state *st = calloc(k, sizeof(*st));

	if (!sock || !st) {
		errno = ENOMEM;
		fail("batch of %d", k);
		goto out;
	}
	lfd = listener_open(0);
	if (lfd < 0)
		goto out;
	if (pipe2(up, O_CLOEXEC) < 0 || pipe2(down, O_CLOEXEC) < 0) {
		fail("pipe");
		goto out;
	}
	fflush(stdout);
	child = fork();
	if (child < 0) {
		fail("fork");
		goto out;
	}
	if (child == 0) {
		close(up[0]);
		close(down[1]);
		batch_peer(lfd, k, salt, up[1], down[0]);
	}
	close(up[1]);
	close(down[0]);
	up[1] = down[0] = -1;
	for (; made < k; made++)
		if ((sock[made] = client_connect(lfd, 0)) < 0)
			goto out;
	close(lfd);
	lfd = -1;
	if (msg_expect(up[0], 'A') < 0)
		goto out;

	int64_t t0 = now_ns();
	for (int i = 0; i < k; i++)
		if (checkpoint(sock[i], &st[i]) < 0)
			goto out;
	int64_t t1 = now_ns();
	for (int i = 0; i < k; i++) {
		close(sock[i]);
		sock[i] = -1;
	}
	int64_t t2 = now_ns();
	batch_fresh_on = opt_options && k >= BATCH_FRESH_FROM;
	if (batch_fresh_on && read_batch_fresh(batch_fresh) < 0)
		goto out;
	for (int i = 0; i < k; i++)
		if ((sock[i] = restore(&st[i])) < 0)
			goto out;
	if (batch_fresh_on) {
		/* a sysctl changed during the batch: the skipped options are set on every socket, as the engine does */
		int again[N_APP_OPTS];
		if (read_batch_fresh(again) < 0)
			goto out;
		if (memcmp(again, batch_fresh, sizeof(again)) != 0)
			for (int i = 0; i < k; i++)
				for (size_t j = 0; j < N_APP_OPTS; j++)
					if (app_opts[j].per_batch && again[j] != NOT_READ &&
					    !(st[i].app.value[j] == 0 && app_opts[j].fresh == 0) &&
					    set_int(sock[i], app_opts[j].level, app_opts[j].opt, st[i].app.value[j], app_opts[j].name) < 0)
						goto out;
	}
	int64_t t3 = now_ns();
	batch_fresh_on = 0;
	times[PH_READ] = t1 - t0;
	times[PH_CLOSE] = t2 - t1;
	times[PH_RESTORE] = t3 - t2;
	for (int i = 0; opt_options && i < k; i++)
		if (check_app_options(sock[i], &st[i].app) < 0)
			goto out;

	if (msg_send(down[1], 'R', NULL) < 0 || probe_exchange(sock, k, salt, 1) < 0 || msg_expect(up[0], 'V') < 0)
		goto out;
	rc = 0;
out:
	batch_fresh_on = 0;
	for (int i = 0; i < made; i++)
		close_abort(sock[i]);
	for (int i = 0; i < 2; i++) {
		if (up[i] >= 0)
			close(up[i]);
		if (down[i] >= 0)
			close(down[i]);
	}
	if (lfd >= 0)
		close(lfd);
	if (child > 0) {
		if (rc < 0)
			kill(child, SIGKILL);
		waitpid(child, NULL, 0);
	}
	free(sock);
	free(st);
	return rc;
}

static void run_batches(struct batch_result *res, int nbatches, int reps)
{
	uint64_t salt = 1;

	for (int i = 0; i < nbatches; i++) {
		res[i].reps = reps;
		res[i].verified = 1;
		res[i].samples = calloc((size_t)reps * N_PHASES, sizeof(int64_t));
		if (res[i].samples == NULL) {
			fprintf(stderr, "repair_cycle: out of memory\n");
			exit(2);
		}
	}
	for (int rep = 0; rep < reps; rep++)
		for (int i = 0; i < nbatches; i++) {
			if (!res[i].verified)
				continue;
			if (batch_cycle(res[i].connections, salt++, res[i].samples + (size_t)res[i].done * N_PHASES) < 0) {
				res[i].verified = 0;
				snprintf(res[i].error, sizeof(res[i].error), "%s", err_msg);
				continue;
			}
			res[i].done++;
		}
}

/* ---- command line and JSON ---- */

static void usage(const char *why)
{
	fprintf(stderr, "repair_cycle: %s\nusage: repair_cycle [--sizes Q,Q,...] [--reps N] [--batches K,K,...] "
			"[--batch-reps R] [--block B] [--options] [--warm]\n", why);
	exit(2);
}

static int parse_list(const char *s, uint64_t *out, int max, uint64_t limit)
{
	int n = 0;
	while (*s) {
		char *end;
		errno = 0;
		unsigned long long v = strtoull(s, &end, 10);
		if (end == s || errno || v > limit || (*end && *end != ',') || n == max)
			usage("bad number list");
		out[n++] = v;
		s = *end ? end + 1 : end;
	}
	return n;
}

static int parse_count(const char *s, int max)
{
	char *end;
	long v = strtol(s, &end, 10);
	if (end == s || *end || v < 1 || v > max)
		usage("bad count");
	return (int)v;
}

static void json_string(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			printf("\\%c", *s);
		else if ((unsigned char)*s < 0x20)
			printf("\\u%04x", *s);
		else
			putchar(*s);
	}
	putchar('"');
}

static void json_samples(const int64_t *samples, int done)
{
	printf("\"samples_ns\": {");
	for (int p = 0; p < N_PHASES; p++) {
		printf("%s\"%s\": [", p ? ", " : "", phase_names[p]);
		for (int r = 0; r < done; r++)
			printf("%s%lld", r ? ", " : "", (long long)samples[(size_t)r * N_PHASES + p]);
		putchar(']');
	}
	putchar('}');
}

static void raise_fd_limit(rlim_t need)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < need) {
		rl.rlim_cur = need;
		if (rl.rlim_max < need)
			rl.rlim_max = need;
		if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
			fprintf(stderr, "repair_cycle: cannot raise RLIMIT_NOFILE to %lu: %s\n", (unsigned long)need,
				strerror(errno));
			exit(2);
		}
	}
}

#define MAX_LIST 64

/* The benchmark's independent check (sockrepair/bench/independent.py) builds this file as a shared library and calls
 * this between its own Python cycles, in the same process: one cycle of the connected socket `fd` the caller made,
 * its queue buffers kept from call to call and grown, every page touched, before the timing starts (as --warm);
 * with `options`, the application options are read and set as with --options. ns[] receives read_state, close and
 * restore. `fd` is closed in every case (silently, in repair mode, once checkpoint has begun). Returns the restored
 * socket, or -1 with repair_cycle_error() saying why. */
int repair_cycle_once(int fd, int options, int64_t ns[3])
{
	static struct conn_state st;
	uint32_t outq = 0, inq = 0;
	int64_t t0, t1, t2, t3;
	int restored;

	opt_options = options;
	opt_warm = 1;
	if (ioctl_int(fd, SIOCOUTQ, &outq, "SIOCOUTQ") < 0 || ioctl_int(fd, SIOCINQ, &inq, "SIOCINQ") < 0 ||
	    reserve(&st.outq, outq, "send queue") < 0 || reserve(&st.inq, inq, "receive queue") < 0) {
		close(fd);
		return -1;
	}
	t0 = now_ns();
	if (checkpoint(fd, &st) < 0) {
		close(fd);
		return -1;
	}
	t1 = now_ns();
	close(fd);
	t2 = now_ns();
	restored = restore(&st);
	t3 = now_ns();
	if (restored < 0)
		return -1;
	ns[0] = t1 - t0;
	ns[1] = t2 - t1;
	ns[2] = t3 - t2;
	if (options && check_app_options(restored, &st.app) < 0) {
		close(restored);
		return -1;
	}
	return restored;
}

const char *repair_cycle_error(void)
{
	return err_msg;
}

int main(int argc, char **argv)
{
	uint64_t sizes[MAX_LIST], batches[MAX_LIST];
	int nsizes = 0, nbatches = 0, reps = 100, batch_reps = 3, ok = 1;
	uint64_t biggest = 0;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--options")) {
			opt_options = 1;
			continue;
		}
		if (!strcmp(argv[i], "--warm")) {
			opt_warm = 1;
			continue;
		}
		if (strcmp(argv[i], "--sizes") && strcmp(argv[i], "--batches") && strcmp(argv[i], "--reps") &&
		    strcmp(argv[i], "--batch-reps") && strcmp(argv[i], "--block"))
			usage("unknown argument");
		if (i + 1 >= argc)
			usage("missing value");
		if (!strcmp(argv[i], "--sizes"))
			nsizes = parse_list(argv[++i], sizes, MAX_LIST, 256u << 20);
		else if (!strcmp(argv[i], "--batches"))
			nbatches = parse_list(argv[++i], batches, MAX_LIST, 200000);
		else if (!strcmp(argv[i], "--reps"))
			reps = parse_count(argv[++i], 1000000);
		else if (!strcmp(argv[i], "--block"))
			opt_block = parse_count(argv[++i], 1000000);
		else
			batch_reps = parse_count(argv[++i], 10000);
	}
	for (int i = 0; i < nbatches; i++) {
		if (batches[i] == 0)
			usage("a batch needs at least one connection");
		biggest = batches[i] > biggest ? batches[i] : biggest;
	}
	/* one fd per connection here (the peer ends live in a child), the listener, pipes, stdio and some slack */
	raise_fd_limit(biggest + 64);

	struct single_result *sres = calloc(nsizes ? nsizes : 1, sizeof(*sres));
	struct batch_result *bres = calloc(nbatches ? nbatches : 1, sizeof(*bres));
	if (!sres || !bres) {
		fprintf(stderr, "repair_cycle: out of memory\n");
		return 2;
	}
	for (int i = 0; i < nsizes; i++)
		sres[i].queue = (uint32_t)sizes[i];
	for (int i = 0; i < nbatches; i++)
		bres[i].connections = (int)batches[i];
	/* Without --warm each checkpoint mallocs its queue buffers and glibc gives big ones back to the kernel on free,
	 * so every peek pays first-touch page faults, as libsoccr and a Python engine do. */
	run_single(sres, nsizes, reps);
	run_batches(bres, nbatches, batch_reps);

	printf("{\"impl\": \"c%s%s\", \"clock\": \"CLOCK_MONOTONIC\", \"buffers\": \"%s\", \"options\": \"%s\", "
	       "\"block\": %d, \"phases\": [", opt_options ? "-options" : "", opt_warm ? "-warm" : "",
	       opt_warm ? "warm" : "fresh", opt_options ? "like-for-like" : "minimal", opt_block);
	for (int p = 0; p < N_PHASES; p++)
		printf("%s\"%s\"", p ? ", " : "", phase_names[p]);
	printf("],\n \"single\": [");
	for (int i = 0; i < nsizes; i++) {
		struct single_result *r = &sres[i];
		ok &= r->verified;
		printf("%s\n  {\"queue_bytes\": %u, \"reps\": %d, \"verified\": %s, \"inq_bytes_min\": %u, "
		       "\"outq_bytes_min\": %u, \"error\": ",
		       i ? "," : "", r->queue, r->done, r->verified ? "true" : "false",
		       r->min_inq == UINT32_MAX ? 0 : r->min_inq, r->min_outq == UINT32_MAX ? 0 : r->min_outq);
		if (r->verified)
			printf("null");
		else
			json_string(r->error);
		printf(", ");
		json_samples(r->samples, r->done);
		putchar('}');
	}
	printf("],\n \"batch\": [");
	for (int i = 0; i < nbatches; i++) {
		struct batch_result *r = &bres[i];
		ok &= r->verified;
		printf("%s\n  {\"connections\": %d, \"reps\": %d, \"verified\": %s, \"error\": ", i ? "," : "",
		       r->connections, r->done, r->verified ? "true" : "false");
		if (r->verified)
			printf("null");
		else
			json_string(r->error);
		printf(", ");
		json_samples(r->samples, r->done);
		putchar('}');
	}
	printf("]}\n");
	return ok ? 0 : 1;
}
