"""One run per workdir: `lock(workdir)` holds an exclusive flock on `workdir/run.lock`.

The lock file names its holder (pid, host, start time); a second run on the same workdir is
refused in one line that names them, before it reads or writes anything else there. The
kernel drops an flock when its process ends however it ends (SIGKILL, a crash, a lost node on
a local disk), so a stale file never blocks the next run. The same call finds a workdir that
cannot be written (a path under a file, a read-only mount, a full disk) and says so in one line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

import errors

LOCK_NAME = 'run.lock'


class WorkdirBusyError(errors.CheckpointError):
  """Another live process holds the workdir."""


class WorkdirLock:
  """The held lock of a workdir; `release()` (or the process ending) frees it."""

  def __init__(self, path: str, fd: int):
    self.path, self._fd = path, fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
    return False


def _unwritable(workdir: str, error: OSError) -> errors.CheckpointError:
  return errors.CheckpointError(f'workdir {workdir} cannot be written: {os.strerror(error.errno)} '
                                f'(errno {error.errno}); nothing was written: free space there or '
                                f'use another --workdir')


def lock(workdir: str) -> WorkdirLock:
  """Creates `workdir` and takes its lock, or raises one line: busy (naming the holder) or
  not writable."""
  path = os.path.join(workdir, LOCK_NAME)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise _unwritable(workdir, e) from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
      raise _unwritable(workdir, e) from None
    raise WorkdirBusyError(f'workdir {workdir} is in use by another run ({holder(workdir)}); '
                           'nothing was written: wait for it to end, stop it, or use another '
                           '--workdir') from None
  record = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                       'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}).encode('utf-8')
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, record + b'\n', 0)
    os.fsync(fd)
  except OSError as e:
    os.close(fd)
    raise _unwritable(workdir, e) from None
  return WorkdirLock(path, fd)


def holder(workdir: str) -> str:
  """'pid P on host H, started T' from the lock file, as far as it can be read."""
  try:
    with open(os.path.join(workdir, LOCK_NAME), encoding='utf-8') as f:
      record = json.loads(f.read() or '{}')
  except (OSError, ValueError):
    record = {}
  if 'pid' not in record:
    return 'a process that has not written its pid yet'
  return f'pid {record["pid"]} on host {record.get("host", "?")}, started {record.get("started", "?")}'
