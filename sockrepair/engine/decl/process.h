/* pidfd (5.3/5.6) to take sockets out of another process, setns to enter a network namespace. */
#define SYS_pidfd_open 434
#define SYS_pidfd_getfd 438
#define CLONE_NEWNET 0x40000000

long syscall(long number, ...);
int setns(int fd, int nstype);
