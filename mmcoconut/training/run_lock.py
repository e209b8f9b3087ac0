"""One training run per output directory: an exclusive lock taken before the "previous run" guard, held for the run.

Without it, two runs started together into one `output_dir` both pass the guard (a check, then an action) and the
second silently replaces the first one's model and checkpoints. The lock is an OS file lock (`filelock`: `flock` on
Unix), so the system releases it when its process dies, even by `kill -9`; beside it, `_mmcoconut_run.json` records
the owner (process id, host, start time) for the message a second run gets. A record left by a dead owner is taken
over with a log line. Under DDP or DeepSpeed the main process (`process_index` 0) holds it for all ranks.
The names start with `_`, which the Trainer's `push_to_hub` leaves out.
"""

import contextlib
import datetime
import json
import logging
import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from mmcoconut.errors import UserFileExistsError

logger = logging.getLogger(__name__)

LOCK_NAME = "_mmcoconut_run.lock"
OWNER_NAME = "_mmcoconut_run.json"


def _read_owner(path):
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _describe(owner):
    if owner is None:
        return "another process (no owner record)"
    return f"process {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


@contextlib.contextmanager
def output_dir_lock(output_dir, main_process=True):
    """Hold `output_dir` for the run inside the `with`; another run into it fails at once (`UserFileExistsError`),
    naming the directory and the owner. Only `main_process` takes the lock; the other ranks pass through."""
    if not main_process:
        yield None
        return
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    owner_path = directory / OWNER_NAME
    lock = FileLock(directory / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserFileExistsError(
            f"output_dir {directory} is in use by another training run ({_describe(_read_owner(owner_path))}); "
            "wait for it to finish, or choose another output_dir"
        ) from None
    try:
        previous = _read_owner(owner_path)
        if previous is not None:  # a clean exit removes the record: its owner died holding the lock
            logger.warning("output_dir %s: taking over the lock of %s, which is no longer running",
                           directory, _describe(previous))
        owner = {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        owner_path.write_text(json.dumps(owner), encoding="utf-8")
        yield lock
    finally:
        owner_path.unlink(missing_ok=True)
        lock.release()


__all__ = ["LOCK_NAME", "OWNER_NAME", "output_dir_lock"]
