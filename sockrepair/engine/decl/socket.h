/* sys/socket.h, netinet/in.h, linux/in6.h: the calls the engine makes on raw fds, and the address layouts. */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOL_SOCKET 1
#define IPPROTO_IP 0
#define IPPROTO_IPV6 41

#define SO_REUSEADDR 2
#define SO_TYPE 3
#define SO_ERROR 4
#define SO_SNDBUF 7
#define SO_RCVBUF 8
#define SO_KEEPALIVE 9
#define SO_PRIORITY 12
#define SO_LINGER 13
#define SO_REUSEPORT 15
#define SO_RCVLOWAT 18
#define SO_BINDTODEVICE 25
#define SO_PEERNAME 28     /* getname(peer=2): the peer of a socket in CLOSE too, where getpeername says ENOTCONN */
#define SO_ACCEPTCONN 30
#define SO_SNDBUFFORCE 32
#define SO_RCVBUFFORCE 33
#define SO_PROTOCOL 38
#define SO_DOMAIN 39
#define SO_MARK 36
#define SO_OOBINLINE 10
#define SO_RCVTIMEO_OLD 20  /* struct timeval (64-bit time_t on 64-bit hosts) */
#define SO_SNDTIMEO_OLD 21
#define SO_GET_FILTER 26    /* = SO_ATTACH_FILTER: with optlen 0 the kernel returns the filter's length */
#define SO_TIMESTAMP_OLD 29
#define SO_TIMESTAMPNS_OLD 35
#define SO_TIMESTAMPING_OLD 37
#define SO_PEEK_OFF 42
#define SO_BUSY_POLL 46
#define SO_MAX_PACING_RATE 47
#define SO_ZEROCOPY 60
#define SO_DONTROUTE 5
#define SO_BINDTOIFINDEX 62
#define SO_COOKIE 57        /* u64, sock_gen_cookie: what sock_diag requests can name */
#define SO_TIMESTAMP_NEW 63
#define SO_TIMESTAMPNS_NEW 64
#define SO_TIMESTAMPING_NEW 65

#define IP_TOS 1
#define IP_TTL 2
#define IP_FREEBIND 15
#define IP_OPTIONS 4
#define IP_MTU_DISCOVER 10
#define IP_RECVERR 11
#define IP_TRANSPARENT 19
#define IP_MINTTL 21
#define IPV6_MTU_DISCOVER 23
#define IPV6_RECVERR 25
#define IPV6_MINHOPCOUNT 73
#define IPV6_TRANSPARENT 75
#define IPV6_HOPOPTS 54
#define IPV6_RTHDRDSTOPTS 55
#define IPV6_RTHDR 57
#define IPV6_DSTOPTS 59
#define IPV6_UNICAST_HOPS 16
#define IPV6_V6ONLY 26
#define IPV6_TCLASS 67

#define SHUT_WR 1
#define MSG_OOB 1
#define MSG_PEEK 2
#define MSG_DONTWAIT 64
#define MSG_NOSIGNAL 16384

typedef unsigned short sa_family_t;
typedef unsigned int socklen_t;

struct sockaddr {
    sa_family_t sa_family;
    char sa_data[14];
};

struct sockaddr_in {
    sa_family_t sin_family;
    uint16_t sin_port;
    uint8_t sin_addr[4];
    uint8_t sin_zero[8];
};

struct sockaddr_in6 {
    sa_family_t sin6_family;
    uint16_t sin6_port;
    uint32_t sin6_flowinfo;
    uint8_t sin6_addr[16];
    uint32_t sin6_scope_id;
};

struct sockaddr_storage {
    sa_family_t ss_family;
    char __ss_padding[126];
};

struct timeval {
    long tv_sec;
    long tv_usec;
};

struct linger {
    int l_onoff;
    int l_linger;
};

int socket(int domain, int type, int protocol);
int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen);
int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen);
int bind(int fd, const struct sockaddr *addr, socklen_t addrlen);
int connect(int fd, const struct sockaddr *addr, socklen_t addrlen);
int getsockname(int fd, struct sockaddr *addr, socklen_t *addrlen);
int getpeername(int fd, struct sockaddr *addr, socklen_t *addrlen);
ssize_t recv(int fd, void *buf, size_t len, int flags);
ssize_t send(int fd, const void *buf, size_t len, int flags);
int close(int fd);
int shutdown(int fd, int how);
