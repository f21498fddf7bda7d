"""TCP_REPAIR on one socket: checkpoint, resume, discard and restore (CRIU's libsoccr, in Python through cffi).

The call order, as the kernel demands it (net/ipv4/tcp.c do_tcp_setsockopt; libsoccr's soccr.h states the same):

Checkpoint (checkpoint):
  1. the socket is plain TCP, IPv4 or IPv6, ESTABLISHED, SYN_SENT, half-closed or CLOSE after a connection
     (tcp_info.tcpi_state; engine/_states.py), and uses nothing engine/registry.py refuses (engine/_refuse.py);
  2. the application's options are read while repair is off (repair mode forces some of them, SO_REUSEADDR);
  3. TCP_REPAIR = 1: the socket is frozen for the application; the kernel's timers still run, so the network lock
     must already hold the peer off;
  4. tcp_info again (the state may have moved; from the refusal checks' sock_diag answer, taken in repair mode),
     tcpi_options / wscale / TCP_MAXSEG (the MSS clamp), TCP_TIMESTAMP, TCP_REPAIR_WINDOW;
  5. per queue: TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ (the sequence number after the queue's last byte), recv(MSG_PEEK),
     and SIOCOUTQNSD before the send queue is selected (with it selected an ACK marks all of it sent); in CLOSE
     the receive queue only, then the pending error (SO_ERROR, which clears it) and SOCK_DONE.

Then either resume (TCP_REPAIR_OFF_NO_WP: nothing goes on the wire; the application's SO_REUSEADDR is put back) or
discard (close(2) while in repair mode: no FIN, no RST).

Restore (restore), on a fresh socket:
  1. TCP_REPAIR = 1, options that must precede bind (SO_REUSEADDR stays forced: setting it would undo repair's reuse),
     SO_SNDBUFFORCE/SO_RCVBUFFORCE large enough for the queues;
  2. bind to the local address, TCP_QUEUE_SEQ per queue (only on a closed socket with empty queues: the sequence of
     the queue's FIRST byte);
  3. TCP_MAXSEG (the clamp the repair-mode connect sizes segments with), connect (no handshake), TCP_MAXSEG 0;
  4. TCP_REPAIR_OPTIONS (MSS, window scale, SACK, timestamps; only before anything was sent), TCP_TIMESTAMP;
  5. the receive queue and the sent-but-unacknowledged part of the send queue written in repair mode;
  6. TCP_REPAIR_WINDOW (before any never-sent byte: passt saw hangs otherwise), options set in repair mode;
  7. for CLOSE, the peer's RST re-created (after its FIN when that matters), then TCP_REPAIR_OFF_NO_WP, the options
     repair mode would reset, and done; otherwise SO_MARK SOCCR_MARK (what the socket sends from now on passes the
     network lock); for a half-closed connection, the close replayed (shutdown in repair mode, the peer's FIN or ACK
     re-created); TCP_REPAIR = 0 (a window probe, unless the socket has nothing to send or re-sends its
     unacknowledged bytes);
  8. the unacknowledged bytes when they fit in the first burst (or all of them when the peer answered that it holds
     exactly up to snd_una: sockrepair.move.ask), then the never-sent ones, written as ordinary data (they leave
     at once); the options repair mode would reset; an ACK of rcv_nxt when no data carried one; the saved mark.
  SYN_SENT stops after step 2: SO_MARK SOCCR_MARK, repair off and connect (the SYN leaves, passing the lock),
  repair on for the options, repair off, the saved mark.

Only the four verbs are public; everything else in this package is private to it.
"""

from sockrepair.engine._checkpoint import checkpoint, discard, resume
from sockrepair.engine._restore import restore

__all__ = ["checkpoint", "discard", "restore", "resume"]
