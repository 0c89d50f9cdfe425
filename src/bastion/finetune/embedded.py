"""The worker that `bastion serve` starts beside itself: a child process, so training never
competes with the event loop for the GIL and a crash in training cannot take the API down."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys

from bastion.config import Settings

log = logging.getLogger("bastion.worker")


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM when the server process dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BASTION_DATA_DIR": str(settings.data_dir),
           "BASTION_DATABASE_URL": settings.resolved_database_url}
    proc = subprocess.Popen([sys.executable, "-m", "bastion.cli", "worker"], env=env,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    log.info("started fine-tuning worker (pid %d)", proc.pid)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM: the worker hands its job back to the queue after the current step."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
