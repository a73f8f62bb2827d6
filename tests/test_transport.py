"""The front-end <-> engine link (service/transport.py): framing, a backlog past the socket buffer, peers leaving."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from service.transport import HEADER, FrameReader, Listener, frame


def test_frames_survive_any_split_and_join():
    messages = [b"", b"a", b"x" * 70_000, bytes(range(256))]
    wire = b"".join(frame(m) for m in messages)
    for cut in (1, 3, 4, 5, 1000, len(wire)):
        reader, got = FrameReader(), []
        for i in range(0, len(wire), cut):
            got += reader.feed(wire[i : i + cut])
        assert got == messages
    with pytest.raises(ValueError, match="over the limit"):
        FrameReader().feed(HEADER.pack(0xFFFFFFFF) + b"junk")


def _poll_until(listener: Listener, cond, timeout_s: float = 10.0) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while not cond(got) and time.monotonic() < deadline:
        got += listener.poll(0.05)
    return got


def test_listener_reads_requests_writes_a_backlog_and_drops_a_closed_peer(tmp_path):
    address = f"unix://{tmp_path}/e.sock"
    (tmp_path / "e.sock").write_bytes(b"")  # a dead engine's leftover file: the new one replaces it
    listener = Listener(address)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(tmp_path / "e.sock"))
    try:
        client.sendall(frame(b"one") + frame(b"two"))  # two requests in one write
        got = _poll_until(listener, lambda g: len(g) >= 2)
        assert [m for _, m in got] == [b"one", b"two"]
        peer = got[0][0]

        # An answer far larger than the socket's buffer, written from another thread while the client does
        # not read yet: the rest waits in the backlog, which the socket thread writes as the client reads.
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB
        sender = threading.Thread(target=peer.send, args=(frame(big) + frame(b"after"),))
        sender.start()
        sender.join(10)
        assert not sender.is_alive() and peer.pending()  # send never blocks its thread
        reader, received = FrameReader(), []
        client.settimeout(0.05)
        deadline = time.monotonic() + 30
        while len(received) < 2 and time.monotonic() < deadline:
            listener.poll(0.01)
            with contextlib.suppress(TimeoutError):
                received += reader.feed(client.recv(1 << 20))
        assert received == [big, b"after"] and not peer.pending()

        client.close()  # the front-end goes away: its peer is dropped, later answers are discarded
        _poll_until(listener, lambda _: not listener.peers)
        assert not listener.peers and peer.closed
        peer.send(frame(b"nobody listens"))  # no error, no backlog
        assert not peer.pending()
    finally:
        client.close()
        listener.close()
    assert not (tmp_path / "e.sock").exists()


def test_a_socket_that_closes_before_any_answer_is_not_counted_as_a_lost_engine(tmp_path):
    """A killed engine's listening socket can take the front-end's reconnect while the process is torn down,
    then close it: that counted a second disconnect for one kill (seen: 2 "lost the engine" lines 1 ms apart,
    service_engine_disconnects_total 2). Here a socket accepts and closes every connection without a word."""
    import asyncio

    from service.client import EngineClient
    from service.metrics import FrontendMetrics

    path = tmp_path / "e.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    accepted = []

    def dying_engine() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                accepted.append(1)
                conn.close()

    threading.Thread(target=dying_engine, daemon=True).start()

    async def run() -> float:
        metrics = FrontendMetrics()
        client = EngineClient(f"unix://{path}", metrics)
        await client.start()
        await asyncio.sleep(0.5)
        await client.close()
        return metrics.engine_disconnects._value.get()

    try:
        disconnects = asyncio.run(run())
    finally:
        server.close()
    assert accepted, "the client never connected"
    assert disconnects == 0
