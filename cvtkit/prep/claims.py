"""Which task builds which part of a shared index: a claim file per part, with a heartbeat.

Correctness never depends on a claim: parts are written atomically and are the same whoever
writes them, so two tasks building one part only waste time. Claims keep that rare. A claim is
taken over when its owner is gone: a dead process on this host, an earlier run of this same Slurm
array task (Slurm ends it before a requeue), or an owner whose heartbeat (the file's mtime,
touched every HEARTBEAT_S) has not moved for STALE_AFTER_S as seen from here (no clock is
compared across hosts).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

HEARTBEAT_S = 10.0
STALE_AFTER_S = 300.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except FileNotFoundError:
        return ""


def _slurm_task() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def owner() -> dict:
    """Who this process is, as written into its claims."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "job": _slurm_task()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    if not os.path.isdir("/proc"):
        return True  # no procfs: os.kill's answer stands
    try:  # a killed process that nobody has waited for yet is a zombie: dead for us
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False  # gone meanwhile
    return state != "Z"


def is_dead(other: dict, me: dict) -> bool:
    """Whether the process that wrote `other` is certainly gone."""
    if other.get("host") == me["host"]:
        if other.get("boot") != me["boot"]:
            return True
        if other.get("pid") != me["pid"] and not pid_alive(int(other.get("pid", 0))):
            return True
    return other.get("job") is not None and other.get("job") == me["job"] and \
        (other.get("host"), other.get("pid")) != (me["host"], me["pid"])


class Claims:
    """The claims of one folder, as seen by this process."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.me = owner()
        self.held: set[str] = set()
        self._seen: dict[str, tuple[int, float]] = {}  # name -> (mtime_ns, when first seen so)
        self._last_beat = time.monotonic()

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.claim"

    def take(self, name: str) -> bool:
        """Claim `name` unless a live owner holds it; True when this process now holds it."""
        path = self.path(name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not self._stale(name):
                return False
            tmp = path.with_name(f".{path.name}.tmp-{self.me['host']}-{self.me['pid']}")
            tmp.write_text(json.dumps(self.me))
            os.replace(tmp, path)  # taken over; a second taker at the same moment only duplicates work
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))
        self.held.add(name)
        return True

    def _stale(self, name: str) -> bool:
        path = self.path(name)
        try:
            text, mtime = path.read_text(), path.stat().st_mtime_ns
        except FileNotFoundError:
            return True  # released meanwhile
        try:
            if is_dead(json.loads(text), self.me):
                return True
        except json.JSONDecodeError:
            pass  # being written: judge by its heartbeat
        now = time.monotonic()
        seen = self._seen.get(name)
        if seen is None or seen[0] != mtime:
            self._seen[name] = (mtime, now)
            return False
        return now - seen[1] >= STALE_AFTER_S

    def beat(self, force: bool = False) -> None:
        """Touch the held claims, at most every HEARTBEAT_S."""
        if not force and time.monotonic() - self._last_beat < HEARTBEAT_S:
            return
        self._last_beat = time.monotonic()
        for name in list(self.held):
            try:
                os.utime(self.path(name))
            except FileNotFoundError:
                self.held.discard(name)  # the index was completed and its claims cleared

    def release(self, name: str) -> None:
        self.held.discard(name)
        self.path(name).unlink(missing_ok=True)

    def clear(self) -> None:
        """Once the index is complete no claim means anything: remove them all."""
        for path in self.folder.glob("*.claim"):
            path.unlink(missing_ok=True)
        self.held.clear()
