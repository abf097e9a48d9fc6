"""Read a scan in a separate process while the caller does something else.

``covidct analyze`` spends its first seconds importing PyTorch and loading the segmentation model, and the
same seconds again decoding the scan (JPEG-Lossless DICOM decoding holds Python's GIL, so a thread would not
overlap with the imports; a process does). :class:`ReadAhead` starts :func:`covidct.io.read` in a fresh
interpreter (``spawn``: nothing of the caller's state, PyTorch included, is copied into it) and hands the
:class:`~covidct.io.volume.Volume` back when asked; an input error comes back as the same one-line
:class:`~covidct.errors.InputError`. If the helper process cannot start or dies, the scan is read in the
calling process instead, so the result never depends on the helper. Zip archives are always read in the
calling process (their members are unpacked into a folder that lives as long as the process that unpacked
them).

As with every ``spawn`` start, a script that uses this at import time needs the usual
``if __name__ == "__main__":`` guard; the command line has it.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np

from covidct.errors import CovidctError, InputError
from covidct.io.archive import is_zip
from covidct.io.volume import Volume


def _read_in_child(conn, path: str, kwargs: dict[str, Any]) -> None:
    """The helper process: read; send ``("ok", volume without its array, shape, dtype)`` and then the
    array's raw bytes down the same pipe (the caller reads them straight into its array: no pickled copy
    on either side), or ``("error", path, reason)``; exit."""
    import signal
    import threading

    from tqdm import tqdm

    from covidct.io import read

    # a stop from the caller ends the read like an error: progress bars clear their line on the way out
    signal.signal(signal.SIGTERM, _stop)
    # tqdm's default lock is a multiprocessing semaphore, which a stopped helper would leave behind
    tqdm.set_lock(threading.RLock())
    array = None
    try:
        volume = read(path, **kwargs)
        array, volume.array = np.ascontiguousarray(volume.array), None
        message: tuple = ("ok", volume, array.shape, array.dtype.str)
    except CovidctError as exc:
        message = ("error", exc.path, exc.reason)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure: the caller reads again by itself
        message = ("failed", f"{type(exc).__name__}: {exc}")
    try:
        conn.send(message)
        if array is not None and array.size:
            _write_all(conn.fileno(), memoryview(array).cast("B"))
    finally:
        conn.close()


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(1)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _read_all(fd: int, view: memoryview) -> None:
    """Fill ``view`` from the pipe ``fd``; ``EOFError`` if the writer stops before it is full."""
    while view:
        n = os.readv(fd, [view])
        if n == 0:
            raise EOFError("the helper process stopped before sending the whole volume")
        view = view[n:]


class ReadAhead:
    """``covidct.io.read(path, **kwargs)`` started now in a helper process; :meth:`result` waits for
    it. A missing path is an :class:`InputError` at once."""

    def __init__(self, path: str | Path, **kwargs: Any) -> None:
        self.path, self.kwargs = Path(path), kwargs
        if not self.path.exists():
            raise InputError(self.path, "no such file or folder")
        self._process = self._conn = None
        self._early: tuple | None = None   # the helper's first message, when raise_if_failed received it
        self.in_background = False
        if is_zip(self.path):
            return
        try:
            ctx = multiprocessing.get_context("spawn")
            self._conn, child_end = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_read_in_child, args=(child_end, str(self.path), kwargs),
                                  name="covidct-read-ahead", daemon=True)
            process.start()
            child_end.close()
            self._process, self.in_background = process, True
        except (OSError, RuntimeError):   # no process could be started: read when asked
            self.close()

    def raise_if_failed(self) -> None:
        """Without waiting: if the helper has already failed to read the input, raise its error now (before the
        caller loads its models, 3 s for `analyze`); if it has already sent the volume's header, keep it for
        :meth:`result`."""
        if not self.in_background or self._early is not None:
            return
        try:
            if not self._conn.poll():
                return
            self._early = self._conn.recv()
        except (EOFError, OSError):   # the helper died: result() reads the input here and says why
            return
        if self._early[0] == "error":
            self.close()
            raise InputError(self._early[1], self._early[2])

    def result(self) -> Volume:
        """The volume (read here if the helper process is absent or failed); input errors re-raised."""
        message = None
        if self.in_background:
            try:
                message = self._early if self._early is not None else self._conn.recv()
                if message[0] == "ok":
                    volume, shape, dtype = message[1:]
                    volume.array = np.empty(shape, np.dtype(dtype))
                    if volume.array.size:
                        _read_all(self._conn.fileno(), memoryview(volume.array).cast("B"))
                    message = ("ok", volume)
            except (EOFError, OSError):    # the helper died (killed, out of memory)
                message = None
            finally:
                self.close(wait=True)
        if message is not None and message[0] == "ok":
            return message[1]
        if message is not None and message[0] == "error":
            raise InputError(message[1], message[2])
        from covidct.io import read

        return read(self.path, **self.kwargs)

    def close(self, *, wait: bool = False) -> None:
        """Release the pipe and stop the helper process; ``wait``: first give it a few seconds to exit by
        itself (after it has sent the volume: a helper stopped while exiting leaves its semaphores to
        multiprocessing's resource tracker, which then warns). Safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            if wait:
                self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.terminate()       # SIGTERM: the helper stops its read and exits
                self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
            self._process.join()
            self._process = None
        self.in_background = False

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
