"""Coverage-guided fuzzing of the sans-I/O session with atheris.

    pip install atheris
    python fuzz/fuzz_session.py -max_total_time=600 fuzz/corpus

Each input is split into a settings byte (prevent / detect / inactive, strict CRLF, tiny limits)
and a byte stream cut into chunks. The harness answers every action the way the I/O layer would
and checks the invariants the server promises: no exception, only well-formed responses, nothing
after a Close, bounded buffering. A violation raises, which atheris reports with the input.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pop3shield.core import actions as A  # noqa: E402
from pop3shield.core.session import HARD_LINE_LIMIT, Session  # noqa: E402
from pop3shield.core.settings import (  # noqa: E402
    PROTECTION_KEYS,
    Action,
    ProtectionSettings,
    ProtectionsConfig,
    SessionSettings,
)
from pop3shield.core.framing import WINDOW  # noqa: E402


class _Verdict:
    def __init__(self, malicious: bool) -> None:
        self.malicious = malicious
        self.reasons = ("fuzz",) if malicious else ()


def _quick(argument: bytes, field: str):
    if b"\x90\x90\x90\x90" in argument:
        return _Verdict(True)
    if len(argument) >= 40:
        return None
    return _Verdict(False)


class _Entry:
    def __init__(self, n: int) -> None:
        self.key = f"k{n}"
        self.uid = f"uid{n}"
        self.size = 10 * n


def settings_for(selector: int) -> SessionSettings:
    """Eight protection mixes from one byte, so the fuzzer explores all modes."""
    action = (Action.PREVENT, Action.DETECT, Action.INACTIVE)[selector % 3]
    mixed = {key: ProtectionSettings(action) for key in PROTECTION_KEYS}
    small = bool(selector & 0x08)
    protections = ProtectionsConfig(
        **mixed,
        strict_crlf=bool(selector & 0x10),
        unknown_commands="violation" if selector & 0x20 else "bad_command",
        bad_commands_limit=3 if small else 10,
        commands_limit=20 if small else 50,
        commands_after_login=20 if small else 1000,
        sasl_line_limit=300 if small else 2048,
    )
    return SessionSettings(hostname="fuzz.invalid", apop=bool(selector & 0x40), protections=protections,
                           input_buffer_limit=4096 if small else 65536)


def check_send(data: bytes) -> None:
    """Every response starts like a POP3 response and every line ends in CRLF."""
    if not (data.startswith((b"+OK", b"-ERR", b"+ ")) and data.endswith(b"\r\n")):
        raise AssertionError(f"malformed response {data[:80]!r}")
    first = data.split(b"\r\n", 1)[0]
    if len(first) + 2 > 512:
        raise AssertionError("status line over 512 octets")
    if b"\r\n" in data[:-2] and not data.endswith(b"\r\n.\r\n"):
        raise AssertionError(f"multi-line response without terminator {data[-40:]!r}")


def run(data: bytes) -> None:
    """One fuzz case."""
    if not data:
        return
    settings = settings_for(data[0])
    session = Session(settings, "192.0.2.1", challenge=b"<1.2@fuzz.invalid>", quick_check=_quick)
    bound = max(settings.input_buffer_limit, HARD_LINE_LIMIT) + 2 * WINDOW
    closed = False
    pending = list(session.start())
    stream = data[1:]
    position = 0
    while True:
        while pending:
            action = pending.pop(0)
            if closed and isinstance(action, A.Send):
                raise AssertionError("data sent after Close")
            if isinstance(action, A.Send):
                check_send(action.data)
            elif isinstance(action, A.Close):
                closed = True
            elif isinstance(action, A.Authenticate):
                ok = action.secret == b"good"
                pending += session.login_succeeded([_Entry(1), _Entry(2)]) if ok else session.login_failed()
            elif isinstance(action, A.StreamMessage):
                check_send(action.status)
                pending += session.stream_finished()
            elif isinstance(action, A.Commit):
                pending += session.commit_finished()
            elif isinstance(action, A.Analyze):
                pending += session.analysis_finished([_Verdict(b"\xcc" in a) for a in action.arguments])
        if session.buffered > bound:
            raise AssertionError(f"buffered {session.buffered} > {bound}")
        if closed or position >= len(stream):
            return
        size = 1 + stream[position] % 64
        chunk = stream[position + 1:position + 1 + size]
        position += 1 + size
        pending += session.receive_data(chunk)


def main() -> None:  # pragma: no cover - needs atheris
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, run)
    atheris.Fuzz()


if __name__ == "__main__":  # pragma: no cover
    main()
