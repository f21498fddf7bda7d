/* linux/tcp.h: the repair interface (TCP_REPAIR since 3.5, TCP_REPAIR_WINDOW since 4.8). */
#define IPPROTO_TCP 6
#define TCP_NODELAY 1
#define TCP_MAXSEG 2
#define TCP_CORK 3
#define TCP_KEEPIDLE 4
#define TCP_KEEPINTVL 5
#define TCP_KEEPCNT 6
#define TCP_LINGER2 8
#define TCP_WINDOW_CLAMP 10
#define TCP_THIN_LINEAR_TIMEOUTS 16
#define TCP_INFO 11
#define TCP_CONGESTION 13
#define TCP_USER_TIMEOUT 18
#define TCP_REPAIR 19
#define TCP_REPAIR_QUEUE 20
#define TCP_QUEUE_SEQ 21
#define TCP_REPAIR_OPTIONS 22
#define TCP_TIMESTAMP 24
#define TCP_NOTSENT_LOWAT 25
#define TCP_REPAIR_WINDOW 29
#define TCP_ULP 31
#define TCP_INQ 36
#define TCP_TX_DELAY 37
#define TCP_AO_INFO 40
#define TCP_RTO_MAX_MS 44
#define TCP_RTO_MIN_US 45
#define TCP_DELACK_MAX_US 46

#define TCP_REPAIR_ON 1
#define TCP_REPAIR_OFF 0
#define TCP_REPAIR_OFF_NO_WP -1

#define TCP_NO_QUEUE 0
#define TCP_RECV_QUEUE 1
#define TCP_SEND_QUEUE 2

#define TCPOPT_MAXSEG 2
#define TCPOPT_WINDOW 3
#define TCPOPT_SACK_PERM 4
#define TCPOPT_TIMESTAMP 8

struct tcp_repair_opt {
    uint32_t opt_code;
    uint32_t opt_val;
};

struct tcp_repair_window {
    uint32_t snd_wl1;
    uint32_t snd_wnd;
    uint32_t max_window;
    uint32_t rcv_wnd;
    uint32_t rcv_wup;
};
