/* ptrace (sys/ptrace.h) to stop a process in a way the kernel undoes when the tracer dies: PTRACE_SEIZE (3.4) and
   PTRACE_INTERRUPT on every thread, PTRACE_DETACH to let it go. glibc's ptrace is variadic: pass pid, addr and data
   cast to int, void * and void *. */
#define PTRACE_GETREGS 12
#define PTRACE_DETACH 17
#define PTRACE_SEIZE 16902
#define PTRACE_INTERRUPT 16903

long ptrace(int request, ...);
