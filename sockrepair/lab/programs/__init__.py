"""The lab's plain programs, the subjects and peers of every migration the demo, the benchmarks and the tests run.
They know nothing of sockrepair (the echo server and the receiver use the standard library only; the client also
loads lab/pattern.py by path) and are always run as `sys.executable PATH` (see sockrepair.lab.subjects), never
imported by the package: a migrated program must not carry the engine with it.

- echo_server.py: the subject, an echo service listening on ADDR:PORT or serving inherited connections;
- client.py: the peer, ping-pong rounds over N connections, checking every echoed byte, timing every round;
- requester.py: the peer as users see it, N independent request/response clients with Poisson arrivals (every
  request's latency) or N connections streaming both ways (the longest pause in what comes back);
- receiver.py: takes restored connections over a UNIX socket (SCM_RIGHTS) and echoes on them."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
ECHO_SERVER = HERE / "echo_server.py"
CLIENT = HERE / "client.py"
RECEIVER = HERE / "receiver.py"
REQUESTER = HERE / "requester.py"
