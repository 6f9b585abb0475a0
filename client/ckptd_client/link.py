"""The client's connection to the daemon: requests matched to replies by id, and events.

A :class:`Link` is one Unix socket to the daemon plus the reader thread that owns its receiving
side. Every request carries a fresh ``id`` that the daemon echoes; the reader hands a reply only
to the request with that id and treats any other reply as a broken daemon. What a timeout means:
a request not answered within ``timeout_s`` *breaks* the link (the socket is shut down, every
waiter is woken), and whoever registered slots on it must treat each of them as of unknown fate,
because the daemon may still act on what it received. A new connection is a new :class:`Link`.

Threads: any thread may call :meth:`Link.request` and :meth:`Link.send` (sends are serialized);
the reader thread runs the owner's callbacks (see :class:`Link`) and nothing else.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from ckptd.errors import (
    CkptdError,
    DaemonNoAnswerError,
    DaemonUnavailableError,
    ProtocolError,
    error_from_reply,
)
from ckptd.protocol import Message, check_daemon_peer, recv_message, send_message

LOST_OP = "__lost__"
"""The ``op`` of the last event a link reports: the connection is gone (``Link.lost_reason``
says why)."""


def error_from(msg: Message) -> CkptdError:
    """The exception a daemon ``error`` / ``failed`` / ``refused`` message stands for."""
    return error_from_reply(msg.get("type"), msg.get("message"))


class _Waiter:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: Message | None = None


class Link:
    """One connection to the daemon at ``path``, checked to be this user's (or root's) daemon.

    ``on_answer(msg)`` runs on the reader thread for an ``accepted`` / ``refused`` reply before
    the request's caller wakes; returning False (the reply names no submitted slot) breaks the
    link. ``on_event(link, msg)`` runs on the reader thread for ``released``, ``committed`` and
    ``failed``, and finally once for ``{"op": LOST_OP}``. ``timeout_s`` (seconds) bounds the
    wait for each reply; the owner may change it between requests.
    """

    EVENTS = frozenset({"released", "committed", "failed"})

    def __init__(
        self,
        path: Path,
        timeout_s: float,
        on_event: Callable[[Link, Message], None],
        on_answer: Callable[[Message], bool],
    ) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(str(path))
            self.daemon_pid = check_daemon_peer(self.sock, path)
        except BaseException:
            self.sock.close()
            raise
        self.lost = False
        self.lost_reason = "the connection was closed"
        self._error: Message | None = None  # a connection-level error the daemon sent
        self._next_id = 0
        self._waiting: dict[int, _Waiter] = {}
        self._send_lock = threading.Lock()
        self._wait_lock = threading.Lock()
        self._on_event = on_event
        self._on_answer = on_answer
        self._reader = threading.Thread(target=self._read, name="ckptd-client-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                msg, fds = recv_message(self.sock)
                for fd in fds:
                    os.close(fd)
                if msg is None:
                    break
                rid = msg.get("id")
                if rid is not None:
                    with self._wait_lock:
                        waiter = self._waiting.pop(rid, None) if isinstance(rid, int) else None
                    if waiter is None:
                        self.lost_reason = f"the daemon sent a reply to no request ({msg['op']!r})"
                        break
                    if msg["op"] in ("accepted", "refused") and not self._on_answer(msg):
                        self.lost_reason = f"the daemon's {msg['op']!r} names no submitted slot"
                        waiter.event.set()  # reply None: unanswered
                        break
                    waiter.reply = msg
                    waiter.event.set()
                elif msg["op"] == "error":
                    self._error = msg  # about the connection; the daemon closes it next
                    self.lost_reason = f"the daemon closed it: {msg.get('message')}"
                    break
                elif msg["op"] in self.EVENTS:
                    self._on_event(self, msg)
                else:
                    self.lost_reason = f"the daemon sent an unexpected {msg['op']!r}"
                    break
        except (OSError, ProtocolError) as exc:
            self.lost_reason = f"the connection failed ({exc})"
        finally:
            self.lost = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            with self._wait_lock:
                waiting, self._waiting = list(self._waiting.values()), {}
            for waiter in waiting:
                waiter.reply = self._error
                waiter.event.set()
            self._on_event(self, {"op": LOST_OP})

    def request(self, msg: Message, fds: list[int] | None = None) -> Message:
        """Send ``msg`` and return its reply (an ``error`` reply raises its exception).

        Raises :class:`DaemonUnavailableError` when it could not be sent, and its subclass
        :class:`DaemonNoAnswerError` when it was sent but not answered (the link is broken then)."""
        waiter = _Waiter()
        with self._send_lock:
            if self.lost:
                raise DaemonUnavailableError(
                    f"the connection to ckptd at {self.path} was lost: {self.lost_reason}"
                )
            self._next_id += 1
            rid = self._next_id
            with self._wait_lock:
                self._waiting[rid] = waiter
            try:
                send_message(self.sock, {**msg, "id": rid}, fds)
            except OSError as exc:
                with self._wait_lock:
                    self._waiting.pop(rid, None)
                self._reader.join(timeout=1.0)  # the daemon may have said why it closed
                if self._error is not None:
                    raise error_from(self._error) from exc
                self.lost_reason = f"cannot send to it: {exc.strerror or exc}"
                self.break_link()
                raise DaemonUnavailableError(
                    f"cannot send {msg['op']!r} to ckptd at {self.path}: {exc.strerror or exc}"
                ) from exc
        if not waiter.event.wait(self.timeout_s):
            self.lost_reason = f"no answer to {msg['op']!r} within {self.timeout_s} s"
            self.break_link()
            # The reader reports the loss (every other handle of this link resolves) before
            # the caller hears of it.
            self._reader.join(timeout=5)
            raise DaemonNoAnswerError(
                f"ckptd at {self.path} did not answer {msg['op']!r} within {self.timeout_s} s; "
                "the connection was dropped and its slots abandoned (the next call reconnects)"
            )
        reply = waiter.reply
        if reply is None:
            self._reader.join(timeout=5)
            raise DaemonNoAnswerError(
                f"ckptd at {self.path} closed the connection during {msg['op']!r}: "
                f"{self.lost_reason}"
            )
        if reply["op"] == "error":
            raise error_from(reply)
        return reply

    def send(self, msg: Message) -> None:
        """A message that gets no reply (``skipped``); lost silently with the link."""
        with self._send_lock:
            try:
                send_message(self.sock, msg)
            except OSError:
                pass

    def break_link(self) -> None:
        """Give up on this connection: the reader sees EOF and reports it lost."""
        self.lost = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.break_link()
        self._reader.join(timeout=5)
        self.sock.close()
