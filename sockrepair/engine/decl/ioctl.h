/* linux/sockios.h: queue sizes of a TCP socket. */
#define SIOCINQ 0x541B       /* FIONREAD: bytes in the receive queue */
#define SIOCOUTQ 0x5411      /* TIOCOUTQ: bytes in the send queue, sent or not */
#define SIOCOUTQNSD 0x894B   /* bytes in the send queue never sent */
#define SIOCGSKNS 0x894C     /* an fd of the socket's network namespace */

int ioctl(int fd, unsigned long request, ...);
