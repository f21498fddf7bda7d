"""The stages of moving connections out of a process, declared once: each stage's name (its key in a report's
`phases_ms`), what it does, and which job runs it. migrate() and dump() time their work only through
Timings.timed(stage), which takes a member of this table: a report carries no stage the table does not explain."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

Job = Literal["migrate", "dump"]
BOTH: tuple[Job, ...] = ("migrate", "dump")


class Stage(Enum):
    """Name, what it does, and the jobs that run it; listed in the order they run."""

    FREEZE = "freeze", "stop every thread of the process (cgroup v2 freezer, else SIGSTOP)", BOTH
    LOCK = ("lock", "drop the connections' packets with the nftables lock, in the process's namespace (migrate: "
            "and in the destination)", BOTH)
    CHECKPOINT = "checkpoint", "repair mode on each socket taken with pidfd_getfd, and read its state", BOTH
    SERIALIZE = "serialize", "encode every state as image bytes", ("migrate",)
    WRITE = "write", "write the images and index.json into the image directory", ("dump",)
    RESUME = ("resume", "leave repair mode without a window probe, deliver what the peers sent meanwhile (kept by "
              "the lock), unlock, deliver what came during that delivery: the process goes on", ("dump",))
    CLOSE = ("close", "end the source: discard every frozen socket (each checked unchanged), SIGKILL the process and "
             "wait for its exit", ("migrate",))
    KILL = "kill", "end the source, as CLOSE (the name dump has always reported)", ("dump",)
    KEEP = ("keep", "write what the peers sent while locked, kept by the lock so far, beside the images "
            "(packets.img: restore -D delivers it)", ("dump",))
    NETWORK = "network", "the caller's network step (e.g. move the service address to the destination)", ("migrate",)
    TRANSFER = "transfer", "decode the image bytes into states", ("migrate",)
    RESTORE = "restore", "make every socket again in the destination namespace, all or none", ("migrate",)
    DELIVER = ("deliver", "send the restored sockets what their peers sent while locked (kept by the lock at "
               "prerouting), before the unlock", ("migrate",))
    UNLOCK = ("unlock", "release the lock in both namespaces: the connections are live again; then deliver what "
              "the lock kept during the delivery", ("migrate",))
    HANDOFF = "handoff", "pass the restored sockets to the caller's program", ("migrate",)

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
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[stage.key] = self.ms.get(stage.key, 0.0) + (time.perf_counter() - start) * 1000
