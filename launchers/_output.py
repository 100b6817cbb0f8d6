"""Copy the children's output to the launcher's streams, one whole prefixed line at a time.

One thread multiplexes every pipe with a selector.  A single writer is what keeps lines from
different ranks from interleaving mid-line, and unlike one blocking reader per pipe it can be told
to stop: a grandchild that outlives its rank (a daemon it spawned) keeps the pipe's write end open
forever, and the launcher must still return.
"""

from __future__ import annotations

import codecs
import os
import selectors
import threading
from typing import IO, TextIO

_CHUNK = 65536
# A "line" that never ends (a progress bar redrawn with \r) is cut here rather than held forever.
_MAX_LINE = 65536


class _Stream:
    def __init__(self, pipe: IO[bytes], prefix: str, out: TextIO) -> None:
        self.pipe = pipe
        self.prefix = prefix
        self.out = out
        # UTF-8 never uses the byte 0x0A inside a character, but a read can split a character.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = ""


class LinePump:
    """Reads registered pipes on a background thread and writes ``prefix + line`` per line."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()  # shared with write_line() callers
        self._finish = threading.Event()
        self._broken: set[int] = set()  # ids of output streams that failed (closed pipe, ...)
        self._thread = threading.Thread(target=self._run, name="launchers-output", daemon=True)

    def add(self, pipe: IO[bytes], prefix: str, out: TextIO) -> None:
        """Register a pipe; only before :meth:`start`."""
        self._selector.register(pipe, selectors.EVENT_READ, _Stream(pipe, prefix, out))

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Copy what is already in the pipes, then stop (without waiting for EOF) and join."""
        self._finish.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is None:  # never started: nothing will close the pipes
            self._close_all()

    def write_line(self, out: TextIO, line: str) -> None:
        """Write one line (newline added) without interleaving with the children's lines."""
        with self._lock:
            self._write(out, line + "\n")

    def _run(self) -> None:
        try:
            while self._selector.get_map():
                finishing = self._finish.is_set()
                events = self._selector.select(0 if finishing else 0.1)
                if finishing and not events:
                    break  # everything the children wrote has been copied
                for key, _ in events:
                    self._read(key.data)
        finally:
            self._close_all()

    def _read(self, stream: _Stream) -> None:
        # os.read, not the file object: a buffered read could hold bytes the selector can't see.
        try:
            data = os.read(stream.pipe.fileno(), _CHUNK)
        except OSError:
            data = b""  # treat a broken pipe like its end
        if not data:
            self._selector.unregister(stream.pipe)
            self._end(stream)
            return
        text = stream.partial + stream.decoder.decode(data)
        *lines, stream.partial = text.split("\n")
        if len(stream.partial) >= _MAX_LINE:
            lines.append(stream.partial)
            stream.partial = ""
        if lines:
            with self._lock:
                for line in lines:
                    self._write(stream.out, f"{stream.prefix}{line}\n")

    def _end(self, stream: _Stream) -> None:
        tail = stream.partial + stream.decoder.decode(b"", final=True)
        stream.partial = ""
        if tail:
            with self._lock:
                self._write(stream.out, f"{stream.prefix}{tail}\n")
        stream.pipe.close()

    def _close_all(self) -> None:
        for key in list(self._selector.get_map().values()):
            self._selector.unregister(key.fileobj)
            self._end(key.data)
        self._selector.close()

    def _write(self, out: TextIO, text: str) -> None:
        if id(out) in self._broken:
            return
        try:
            out.write(text)
            out.flush()  # a line reaches a pipe or log file as soon as the child printed it
        except (OSError, ValueError):
            # The reader went away (``| head``) or the stream was closed: keep draining the
            # children so they never block on a full pipe, but stop writing.
            self._broken.add(id(out))
