"""The stages of moving connections out of a process, declared once: each stage's name (its key in a report's
`phases_ms`), what it does, and which job runs it. migrate() and dump() time their work only through
Timings.timed(stage), which takes a member of this table: a report carries no stage the table does not explain.

Fault injection, for tests: with SOCKREPAIR_FAULT=JOB:STAGE:ACTION in the environment (e.g. "migrate:close:kill";
JOB is migrate, dump or restore),
the mover raises InjectedFault (ACTION "raise") or sends itself SIGINT, SIGTERM or SIGKILL ("int", "term", "kill"),
or SIGKILL to its whole process group ("killgroup": `kill -KILL -- -PGID`, a mover that leads its group only)
as stage STAGE of JOB begins; "STAGE.end" acts once the stage's work is done, before the next stage."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

Job = Literal["migrate", "dump", "restore"]
BOTH: tuple[Job, ...] = ("migrate", "dump")
LANDING: tuple[Job, ...] = ("migrate", "restore")


class Stage(Enum):
    """Name, what it does, and the jobs that run it; listed in the order they run (but `sockrepair restore
    --unix` hands off before it unlocks, and with --exec its guard unlocks once the program runs)."""

    LOAD = ("load", "restore: wait until no move holds the image directory, check that its images are not stale, "
            "read them and the packets kept beside them, check the handoff's target", ("restore",))
    FREEZE = ("freeze", "stop every thread of the process (cgroup v2 freezer, else SIGSTOP) where every thread waits: "
              "a busy one is let go and stopped again, within the quiescence timeout (sockrepair.move.quiesce)", BOTH)
    LOCK = ("lock", "drop the connections' packets with the nftables lock, in the process's namespace (migrate: "
            "and in the destination when it is another one)", BOTH)
    CHECKPOINT = "checkpoint", "repair mode on each socket taken with pidfd_getfd, and read its state", BOTH
    SERIALIZE = "serialize", "encode every state as image bytes", ("migrate",)
    JOURNAL = ("journal", "write the images into the journal directory (fsynced unless under /run): from here on a failure leaves "
               "what `sockrepair restore -D DIR` completes the move from", ("migrate",))
    WRITE = "write", "write the images and index.json into the image directory and fsync them", ("dump",)
    RESUME = ("resume", "leave repair mode without a window probe, deliver what the peers sent meanwhile (kept by "
              "the lock), unlock, deliver what came during that delivery: the process goes on", ("dump",))
    CLOSE = ("close", "end the source: check every frozen socket unchanged, SIGKILL the process, disconnect and "
             "close our copies of its sockets (silently: repair mode), which frees their 4-tuples, and accept what "
             "waits in its listeners (sockrepair.move.backlog); the process exits meanwhile, and the restore waits "
             "for that exit once its sockets are made", ("migrate",))
    KILL = ("kill", "end the source, as CLOSE, and wait for its exit (the name dump has always reported); the "
            "connections accepted from its listeners are locked, checkpointed and added to the image directory here "
            "(sockrepair.move.backlog.carry)", ("dump",))
    KEEP = ("keep", "write what the peers sent while locked, kept by the lock so far, beside the images "
            "(packets.img: restore -D delivers it)", ("dump",))
    NETWORK = "network", "the caller's network step (e.g. move the service address to the destination)", ("migrate",)
    RESTORE = ("restore", "ask the peers of connections with bytes in flight what they hold (one round trip, at most "
               "200 ms: sockrepair.move.ask), then make every socket again in the destination namespace, all or none, "
               "each duplicated to its guard as soon as it is made (migrate: from the checkpointed states, "
               "sockrepair.move.freeze; restore: sockrepair.move.restoreguard)", LANDING)
    DELIVER = ("deliver", "send the restored sockets what their peers sent while locked (kept by the lock at "
               "prerouting; restore: read from packets.img), before the unlock", LANDING)
    UNLOCK = ("unlock", "release the lock in both namespaces when they differ (restore: in the one restored into, "
              "and mark the move completed): the connections are live again; migrate then delivers what the lock "
              "kept during the delivery", LANDING)
    HANDOFF = ("handoff", "pass the restored sockets to the caller's program (migrate: then the connections accepted "
               "at the close; restore: over --unix, then record them as handed off in the directory; or exec --exec)",
               LANDING)

    key: str
    does: str
    jobs: tuple[Job, ...]

    def __new__(cls, key: str, does: str, jobs: tuple[Job, ...]) -> Stage:
        stage = object.__new__(cls)
        stage._value_ = key
        stage.key = key
        stage.does = does
        stage.jobs = jobs
        return stage


@dataclass
class Timings:
    """Wall-clock milliseconds per stage of one `job`, keyed by Stage.key in the order the stages ran; a stage
    timed twice (the lock, taken in two namespaces) adds up."""

    job: Job
    ms: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, stage: Stage) -> Iterator[None]:
        """Time the block as `stage`. Raises TypeError for anything but a Stage, ValueError for a stage that is
        not one of the job's."""
        if not isinstance(stage, Stage):
            raise TypeError(f"{stage!r} is not a stage of sockrepair.move.stages.Stage")
        if self.job not in stage.jobs:
            raise ValueError(f"{self.job} has no stage {stage.key!r}")
        inject(self.job, stage.key)
        start = time.perf_counter()
        try:
            yield
            inject(self.job, stage.key + ".end")
        finally:
            self.ms[stage.key] = self.ms.get(stage.key, 0.0) + (time.perf_counter() - start) * 1000


class InjectedFault(RuntimeError):
    """Raised only by the test hook below, as a stand-in for any failure of a stage's work (not a SockrepairError:
    nothing but a test asks for it). `.point`: the stage key, or "STAGE.end"."""

    def __init__(self, message: str, point: str) -> None:
        super().__init__(message)
        self.point = point


FAULT_ENV = "SOCKREPAIR_FAULT"
_SIGNALS = {"int": signal.SIGINT, "term": signal.SIGTERM, "kill": signal.SIGKILL}


def inject(job: str, point: str) -> None:
    """The test hook (see the module's docstring): acts when SOCKREPAIR_FAULT names `job` and `point`. Raises
    InjectedFault, or ValueError for an action it does not know."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want_job, _, rest = spec.partition(":")
    want_point, _, action = rest.rpartition(":")
    if want_job != job or want_point != point:
        return
    if action == "raise":
        raise InjectedFault(f"fault injected at {job} {point}", point)
    if action == "killgroup":
        if os.getpgrp() != os.getpid():  # the group would be the test runner's too
            raise ValueError(f"{FAULT_ENV}={spec!r}: killgroup needs a mover that leads its process group")
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if action not in _SIGNALS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: action {action!r} is not raise, int, term, kill or killgroup")
    os.kill(os.getpid(), _SIGNALS[action])
