"""``transport.write`` that sends at once when nothing is queued: one syscall, no reactor turn.

Twisted's ``FileDescriptor.write`` only queues: it registers the socket for writability
(``epoll_ctl``), the reactor's next turn sees it writable, ``doWrite`` sends, and the socket is
unregistered again (``epoll_ctl``). For a server that answers each command with one small write
(a relayed session: about thirty replies and commands, on two connections) that is two extra
syscalls and one extra trip through the reactor per write, a large share of the CPU a session costs.

:func:`write` sends a small write (:data:`MAX_EAGER`) directly with ``socket.send`` when the
transport is a plain TCP connection
(``tcp.Server``/``tcp.Client``, no TLS layer), connected, not closing, and its buffer is empty, so
nothing can be reordered; whatever the kernel does not take (a full send buffer, or any error)
goes to ``transport.write`` as before, which queues it, pauses a registered producer past
``bufferSize``, and lets ``doWrite`` meet the error and close the connection the usual way. Any other
transport (TLS, a unix socket, a test's ``StringTransport``) just gets ``transport.write``.
So the bytes on the wire, their order, backpressure and error handling are what they were; only
the moment an uncongested write leaves is earlier (at once, instead of at the reactor's next turn).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["write"]

#: exactly these classes (not subclasses, e.g. unix sockets that pass file descriptors along)
_PLAIN = (tcp.Server, tcp.Client)
#: larger writes (a message streamed in 64 KiB chunks) take the queued path: one send per chunk
#: either way, and the reactor's writability pacing is what keeps the kernel's buffers from
#: absorbing megabytes that backpressure and the write-stall timer should see
MAX_EAGER = 16 * 1024


def write(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once where that cannot change anything but the timing."""
    if type(transport) in _PLAIN and 0 < len(data) <= MAX_EAGER and _idle(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN/ENOBUFS, or a real error: the ordinary path handles it
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _idle(transport: Any) -> bool:
    """Connected, not closing, nothing queued: a send now cannot overtake anything. The attributes
    are Twisted's own (``FileDescriptor``'s buffer); a Twisted without them gets the queued path."""
    try:
        return bool(not transport.TLS and transport.connected and not transport.disconnecting
                    and not transport._writeDisconnected and not transport._writeDisconnecting
                    and not transport._tempDataBuffer and transport.offset == len(transport.dataBuffer))
    except AttributeError:
        return False
