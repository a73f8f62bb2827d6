"""The link between HTTP front-ends and the engine: msgpack messages, each length-prefixed, over a Unix
stream socket (the engine listens; each front-end process holds one connection).

Hand-written on the standard library rather than ZeroMQ (which this project used before), because of
what ZeroMQ's I/O threads cost on a small machine. Every message crossed two of them on its way
(sender -> its I/O thread -> the receiver's I/O thread -> the receiving thread), four thread wake-ups
per direction. On a 2-core Xeon (family 6 model 207), 2-layer model, wrk c=1, timestamps along one
request's path (p50 of 2,100 requests) showed:
  - 110 us from the front-end's send to the engine's receive;
  - 73 us from the batcher's answer to the engine's socket thread;
  - 134 us from there to the front-end's event loop;
  - 317 us in all, against 1,076 us of compute.
Here a front-end writes its request straight into the socket from its event loop, and the engine's
socket thread reads it. The thread that finished a batch writes the answers itself: no hop through
another thread, unless the socket's buffer is full. A dead engine closes its end, so a front-end sees
the loss at once, as it saw ZeroMQ's disconnect event.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections import deque
from pathlib import Path

HEADER = struct.Struct("<I")  # the payload's length in bytes
MAX_MESSAGE_BYTES = 1 << 30  # a tokenizer's JSON is the largest message (a few MiB)
READ_BYTES = 1 << 20


def frame(payload: bytes) -> bytes:
    """One message as it goes on the wire: its length, then its bytes."""
    return HEADER.pack(len(payload)) + payload


def socket_path(address: str) -> str:
    """The filesystem path of an engine address (`unix:///path/engine.sock`, or a bare path)."""
    return address.removeprefix("unix://")


class FrameReader:
    """Bytes in, whole messages out: a stream splits and joins messages anywhere."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out, pos, end = [], 0, len(buf)
        while end - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > MAX_MESSAGE_BYTES:
                raise ValueError(f"a {size}-byte message is over the limit; the peer speaks another protocol")
            if end - pos - HEADER.size < size:
                break
            start = pos + HEADER.size
            out.append(bytes(buf[start : start + size]))
            pos = start + size
        if pos:
            del buf[:pos]
        return out


class Peer:
    """The engine's end of one front-end's connection. `send` may be called from any thread."""

    def __init__(self, sock: socket.socket, wake: socket.socket):
        self.sock, self._wake = sock, wake
        self.reader = FrameReader()
        self._lock = threading.Lock()
        self._backlog: deque[bytes] = deque()  # what the socket's buffer did not take yet
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        """Write `data` now if the socket takes it (the usual case), else leave the rest to the socket thread."""
        with self._lock:
            if self.closed:
                return  # the front-end went away: nobody waits for these answers
            if not self._backlog:
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return  # reset by the peer; the socket thread sees it and closes
                if sent == len(data):
                    return
                data = data[sent:]
            self._backlog.append(data)
        with contextlib.suppress(BlockingIOError):  # a full wake-up pipe: the socket thread is woken already
            self._wake.send(b"w")

    def pending(self) -> bool:
        return bool(self._backlog)

    def flush(self) -> bool:
        """Socket thread: write what the backlog holds, as far as the socket takes it; True once empty."""
        with self._lock:
            while self._backlog:
                try:
                    sent = self.sock.send(self._backlog[0])
                except BlockingIOError:
                    return False
                except OSError:
                    self._backlog.clear()
                    return True
                if sent < len(self._backlog[0]):
                    self._backlog[0] = self._backlog[0][sent:]
                    return False
                self._backlog.popleft()
            return True

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._backlog.clear()
        self.sock.close()


class AddressInUse(RuntimeError):
    """Another process listens on the engine's socket path."""


def _listening(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at `path` (a file left by a dead one refuses)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:  # no file, a stale socket (ECONNREFUSED), not a socket
        return False
    finally:
        probe.close()
    return True


class Listener:
    """The engine's socket thread: accepts front-ends, reads their messages, writes backlogs.

    `poll(timeout_s)` returns [(peer, message bytes), ...] that arrived; the caller handles them.
    """

    def __init__(self, address: str):
        path = Path(socket_path(address))
        if _listening(path):  # was: unlinked and re-bound, cutting the running engine off its front-ends
            raise AddressInUse(
                f"another engine is listening on {address}; stop it first, or give this one another --address"
            )
        path.unlink(missing_ok=True)  # left by an engine that died: this one replaces it
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(64)
        self._server.setblocking(False)
        self._path = path
        self._inode = path.stat().st_ino  # close() removes the file only while it is still this socket
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._server, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.peers: set[Peer] = set()
        self._writing: set[Peer] = set()

    def poll(self, timeout_s: float) -> list[tuple[Peer, bytes]]:
        got: list[tuple[Peer, bytes]] = []
        woken = False
        for key, events in self._sel.select(timeout_s):
            if key.data == "accept":
                self._accept()
            elif key.data == "wake":
                woken = True
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                peer: Peer = key.data
                if events & selectors.EVENT_READ:
                    got.extend((peer, m) for m in self._read(peer))
                if events & selectors.EVENT_WRITE and not peer.closed and peer.flush():
                    self._watch_writes(peer, False)
        # backlogs the other threads left: Peer.send wakes this thread after each one (a full wake-up pipe
        # means a wake-up is pending already), so peers are looked over only when woken
        for peer in list(self.peers) if woken else ():
            if peer.pending() and peer not in self._writing and not peer.closed:
                self._watch_writes(peer, True)
        return got

    def flush_all(self, timeout_s: float) -> None:
        """Until every backlog is written or `timeout_s` passes (the engine's last answers at shutdown)."""
        for _ in range(max(1, int(timeout_s / 0.01))):
            if not any(p.pending() for p in self.peers if not p.closed):
                return
            self.poll(0.01)

    def close(self) -> None:
        for peer in list(self.peers):
            self._drop(peer)
        self._sel.close()
        self._server.close()
        self._wake_r.close()
        self._wake_w.close()
        with contextlib.suppress(FileNotFoundError):
            if self._path.stat().st_ino == self._inode:  # not another engine's socket bound there since
                self._path.unlink()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
            peer = Peer(sock, self._wake_w)
            self.peers.add(peer)
            self._sel.register(sock, selectors.EVENT_READ, peer)

    def _read(self, peer: Peer) -> list[bytes]:
        messages: list[bytes] = []
        while True:
            try:
                data = peer.sock.recv(READ_BYTES)
            except BlockingIOError:
                return messages
            except OSError:
                data = b""
            if not data:  # the front-end closed (or its process died)
                self._drop(peer)
                return messages
            try:
                messages.extend(peer.reader.feed(data))
            except ValueError:
                self._drop(peer)
                return messages
            if len(data) < READ_BYTES:  # drained (the selector reports more next time): no extra recv
                return messages

    def _watch_writes(self, peer: Peer, on: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        self._sel.modify(peer.sock, events, peer)
        (self._writing.add if on else self._writing.discard)(peer)

    def _drop(self, peer: Peer) -> None:
        if peer in self.peers:
            self.peers.discard(peer)
            self._writing.discard(peer)
            self._sel.unregister(peer.sock)
            peer.close()
