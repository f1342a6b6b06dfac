"""Run benchmark rows in a worker process that a row past its time limit cannot hold up.

A method that never returns (a line search that loops inside one compiled XLA call, where no
Python signal can reach it) would otherwise stop the whole suite. :class:`Worker` keeps one
spawned process that runs tasks one after another, so the rows cost what they would in the
parent (the imports are paid once, every row still empties JAX's caches); a task past
``timeout_s`` kills the process, the row records a :class:`RowTimeout`, and the next task
starts a fresh process. A task is named ``"module:function"`` and takes picklable arguments.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import traceback
from typing import Any

__all__ = ["RowFailed", "RowTimeout", "Worker"]


_START_S = 600  # seconds the worker's imports may take


class RowTimeout(RuntimeError):
    """A task ran past the worker's time limit; its process was killed."""


class RowFailed(RuntimeError):
    """A task raised in the worker; the message is the worker's exception, type first."""


def _serve(conn: Any) -> None:
    """The worker's loop: one ``(task, args)`` at a time until ``None``. The heavy imports come
    first, before the worker says it is ready, so no row's time limit pays for them."""
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float64)
    try:
        import jax  # noqa: F401
        import numpyro  # noqa: F401
    except ImportError:
        pass
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return  # the parent is gone
        if msg is None:
            return
        task, args = msg
        module, _, name = task.partition(":")
        try:
            out = getattr(importlib.import_module(module), name)(*args)
        except BaseException as exc:  # noqa: BLE001 - sent back, raised in the parent
            text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
            reply = ("error", text, traceback.format_exc())
        else:
            reply = ("ok", out, None)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return  # the parent is gone (killed): nobody to run rows for


class Worker:
    """One worker process at a time; ``worker(task, *args)`` runs a task in it.

    Args:
        timeout_s: the most seconds one task may take; ``None``: no limit.
    """

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None

    def __call__(self, task: str, *args: Any) -> Any:
        """The task's return value.

        Raises:
            RowTimeout: the task ran past ``timeout_s`` (its process is killed).
            RowFailed: the task raised; the message holds its exception.
        """
        if self._proc is None or not self._proc.is_alive():
            self._start()
        self._conn.send((task, args))
        if not self._conn.poll(self.timeout_s):
            self.close(kill=True)
            raise RowTimeout(f"{task} ran past the row limit of {self.timeout_s:g} s")
        try:
            status, out, trace = self._conn.recv()
        except EOFError as exc:  # the process died (out of memory, a crash in native code)
            self.close(kill=True)
            raise RowFailed(f"the worker process died running {task}") from exc
        if status == "error":
            raise RowFailed(out)
        return out

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(_START_S) or parent.recv() != "ready":
            self.close(kill=True)
            raise RowFailed(f"the worker process did not start within {_START_S} s")

    def close(self, kill: bool = False) -> None:
        """Stop the worker process (at once with ``kill``)."""
        if self._proc is None:
            return
        if not kill and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(30)
            except (BrokenPipeError, OSError):
                pass
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
        self._proc = self._conn = None
