"""Synchronous Maildir store behind the POP3 session.

Blocking file I/O on purpose: the Twisted layer calls every method through
``deferToThread``, so this module must not import Twisted and each instance
guards its own mutable state (lock file, directory handles) with a mutex.

Policy decisions (the "why"):

* Messages are read from ``new/`` and ``cur/``; files in ``new/`` stay there.
  Nothing here deletes or renames on its own: only :meth:`Maildir.delete`,
  called by the server in the UPDATE state, removes files.
* Only regular files count. Dot-files, subdirectories, FIFOs/devices and
  *all* symlinks are ignored, and messages are opened with ``O_NOFOLLOW``, so
  a planted symlink can never make us serve a file from elsewhere (stricter
  than ignoring only symlinks that point outside; real deliveries never
  create symlinks).
* Directories are not followed either. With ``root`` (the configured base
  directory, which the operator trusts, symlinks and all), every directory
  from there down to the Maildir, and ``cur/`` and ``new/`` themselves, is
  opened one component at a time with ``O_NOFOLLOW``; a symlink anywhere on
  that path refuses the mailbox (MailboxError, logged with the mailbox).
  Listing, opening, locking and deleting then go through those directory
  handles, so swapping ``cur/`` for a symlink after login changes nothing.
  (:meth:`Maildir.deliver`, used by the demo and tests only, works on paths.)
* Sizes are what the encoder sends
  (:func:`~pop3shield.core.dotstuff.wire_size`: CRLF line ends, before
  dot-stuffing). A Maildir++ ``,W=<n>`` field in the name is exactly that
  size for a message that ends with a line end, so it is used without
  opening the file when it is consistent with the file: ``st_size <= W <=
  2 * st_size`` (every LF can become CRLF, nothing else grows) and, if
  ``,S=`` is there too, ``S == st_size``. A name that fails those checks is
  ignored and the file is read. ``,S=`` alone does not give the wire size
  (the number of bare LFs is unknown), so such files are read. Opening a
  message whose size came from its name checks its last byte: if it is not
  LF, the name's size was short by the CRLF the encoder adds, so the open is
  refused (nothing has been sent yet) and the true size is cached for the
  next login.
* Sizes that had to be read are kept in a process-wide :class:`SizeCache`
  (bounded, LRU by mailbox, thread-safe) keyed by mailbox path and message
  key and validated by (st_size, st_mtime_ns, st_ino), so a second login to
  an unchanged mailbox costs one stat per file and reads nothing.
* The scan records each message's identity (st_size, st_mtime_ns, st_ino);
  :meth:`Maildir.open_message` refuses a file whose identity changed since
  (MessageChanged), so RETR never promises one size and sends another.
* UIDL is the Maildir unique name (the part before the first ':'), which
  survives the new/ -> cur/ move and flag changes. Names that are not valid
  UIDL text (0x21-0x7E, 1-70 chars) get ``"~" + sha256(name)[:40]``; plain
  names starting with '~' are hashed too, so the two forms can never collide.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import logging
import os
import re
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from pop3shield.core.dotstuff import wire_size_chunks

__all__ = [
    "LOCK_NAME",
    "MailboxError",
    "MailboxInUse",
    "Maildir",
    "MessageChanged",
    "MessageInfo",
    "SIZE_CACHE",
    "SizeCache",
]

log = logging.getLogger(__name__)

LOCK_NAME = ".pop3shield.lock"
# new/ first: a message moved new/ -> cur/ between the two listings is then
# seen twice (and de-duplicated, cur/ wins) rather than not at all.
_MESSAGE_DIRS = ("new", "cur")
_LAYOUT_DIRS = ("cur", "new", "tmp")
_READ_SIZE = 64 * 1024
_UID_MAX = 70
_HASH_PREFIX = "~"
_HASH_HEX_LEN = 40
_DELIVER_ATTEMPTS = 10
#: how often a waiting lock() tries again
_LOCK_POLL = 0.05
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | _O_CLOEXEC
# Maildir++ size fields in the unique name: ",S=<file size>" and ",W=<size with CRLF>".
_SIZE_FIELD = re.compile(r",([SW])=([0-9]{1,19})(?=,|$)")
#: default bound of the process-wide size cache, in messages
SIZE_CACHE_ENTRIES = 200_000
# Process-wide so two Maildir instances delivering in the same microsecond
# still get different names (the Maildir spec's "Q" delivery counter).
_delivery_counter = itertools.count(1)

#: (st_size, st_mtime_ns, st_ino): what "the same file, unchanged" means here
Identity = tuple[int, int, int]


class MailboxInUse(Exception):
    """Another session holds the mailbox lock."""


class MailboxError(Exception):
    """Missing/unreadable maildir and similar; text is for operators, not clients."""


class MessageChanged(MailboxError):
    """The message file is not the one the scan measured: its size may differ from the one promised."""


@dataclass(frozen=True)
class MessageInfo:
    """One message as seen by a POP3 session."""

    key: str  # "new/<name>" or "cur/<name>": identifies the file for open/delete
    uid: str  # stable UIDL, 0x21-0x7E, 1-70 chars
    size: int  # == dotstuff.wire_size(content): the octets RETR delivers
    #: (st_size, st_mtime_ns, st_ino) of the file the size belongs to
    identity: Identity | None = field(default=None, compare=False)


def _identity(st: os.stat_result) -> Identity:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class SizeCache:
    """Wire sizes that had to be read, kept across logins: mailbox -> {key: (identity, size)}.

    Bounded by the total number of messages (least recently scanned mailboxes go first; a
    single mailbox larger than the bound keeps only the first ``max_entries``) and safe to
    use from many threads. A mailbox's table is replaced whole after each scan, never
    changed in place, so a reader can keep using the table it got.
    """

    def __init__(self, max_entries: int = SIZE_CACHE_ENTRIES) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._boxes: OrderedDict[str, dict[str, tuple[Identity, int]]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def mailbox(self, path: str) -> Mapping[str, tuple[Identity, int]]:
        """The cached table of one mailbox (empty if none); do not modify it."""
        with self._lock:
            box = self._boxes.get(path)
            if box is None:
                return {}
            self._boxes.move_to_end(path)
            return box

    def store(self, path: str, entries: dict[str, tuple[Identity, int]]) -> None:
        """Replace the table of ``path`` (keeps it only within the bound)."""
        if len(entries) > self.max_entries:
            entries = dict(itertools.islice(entries.items(), self.max_entries))
        with self._lock:
            old = self._boxes.pop(path, None)
            if old is not None:
                self._count -= len(old)
            if entries:
                self._boxes[path] = entries
                self._count += len(entries)
            while self._count > self.max_entries:
                _, evicted = self._boxes.popitem(last=False)
                self._count -= len(evicted)

    def update(self, path: str, key: str, identity: Identity, size: int) -> None:
        """Add or correct one entry (copy on write)."""
        with self._lock:
            entries = dict(self._boxes.get(path, {}))
        entries[key] = (identity, size)
        self.store(path, entries)

    def clear(self) -> None:
        with self._lock:
            self._boxes.clear()
            self._count = 0


#: the cache every Maildir uses unless given another
SIZE_CACHE = SizeCache()


@dataclass(frozen=True)
class _Scanned:
    """What the scan measured for one key: the file it measured and where the size came from."""

    identity: Identity
    size: int
    from_name: bool


def _base_name(name: str) -> str:
    """Maildir unique name: everything before the first ':' (info/flags)."""
    return name.split(":", 1)[0]


def _size_from_name(name: str, st: os.stat_result) -> int | None:
    """The ``,W=`` size of a Maildir++ name, if present and consistent with the file; else None."""
    fields: dict[str, int] = {}
    for tag, digits in _SIZE_FIELD.findall(_base_name(name)):
        fields.setdefault(tag, int(digits))
    wire = fields.get("W")
    if wire is None:
        return None
    if "S" in fields and fields["S"] != st.st_size:
        return None  # the name describes another file (or lies)
    if not st.st_size <= wire <= 2 * st.st_size:
        return None  # impossible: LF -> CRLF at most doubles, nothing else grows
    return wire


def _uid_for(base: str) -> str:
    """UIDL for a unique name; hashed when it is not valid UIDL text."""
    if (
        0 < len(base) <= _UID_MAX
        and base.isascii()
        and base.isprintable()
        and " " not in base
        and not base.startswith(_HASH_PREFIX)
    ):
        return base
    raw = base.encode("utf-8", "surrogateescape")
    return _HASH_PREFIX + hashlib.sha256(raw).hexdigest()[:_HASH_HEX_LEN]


def _delivery_time(base: str, st: os.stat_result) -> int:
    """Seconds from the leading "time." of a Maildir name, else the file mtime.

    The name is preferred because it never changes; mtime is only a fallback
    for names written by non-conforming tools.
    """
    head = base.split(".", 1)[0]
    if head.isascii() and head.isdigit() and len(head) <= 12:
        return int(head)
    return int(st.st_mtime)


def _split_key(key: str) -> tuple[str, str]:
    """Validate a message key and return (subdir, name); ValueError if unsafe."""
    if not isinstance(key, str):
        raise ValueError("message key must be a str")
    sub, sep, name = key.partition("/")
    if (
        not sep
        or sub not in _MESSAGE_DIRS
        or not name
        or "/" in name
        or "\0" in name
        or name.startswith(".")
    ):
        raise ValueError(f"invalid message key {key!r}")
    return sub, name


def _safe_hostname() -> str:
    """Hostname for unique names, with '/' and ':' escaped as the Maildir spec says."""
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


def _fsync_dir(path: str) -> None:
    """Make renames/unlinks in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Maildir:
    """A Maildir as one POP3 session sees it (see the module docstring).

    ``root`` is the trusted base directory (``/var/mail`` for ``/var/mail/{user}/Maildir``):
    no directory below it may be a symlink. With ``create`` and ``root``, a missing Maildir
    directory (only the last component: its parent must exist) is created with cur/ new/ tmp/;
    without ``root``, ``create`` makes the whole path as ``mkdir -p`` does. The instance holds
    open directory handles until :meth:`close` (or garbage collection).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        root: str | os.PathLike[str] | None = None,
        size_cache: SizeCache | None = SIZE_CACHE,
    ) -> None:
        self.path = os.fsdecode(os.fspath(path))
        self.root = None if root is None else os.fsdecode(os.fspath(root))
        self._mutex = threading.RLock()
        self._lockfile: BinaryIO | None = None
        self._dirs: dict[str, int] = {}
        self._cache = size_cache
        self._cache_key = os.path.abspath(self.path)
        # key -> what the last scan measured (the promise RETR must keep)
        self._scanned: dict[str, _Scanned] = {}
        if create and self.root is None:
            self.create_layout()
        self._dirs = self._open_dirs(create=create and self.root is not None)

    # -- layout and locking -------------------------------------------------

    def create_layout(self) -> None:
        """Create the maildir and cur/ new/ tmp/ (mode 0700); existing dirs are left alone."""
        try:
            self._mkdir_private(self.path, parents=True)
            for sub in _LAYOUT_DIRS:
                self._mkdir_private(os.path.join(self.path, sub))
        except OSError as exc:
            raise MailboxError(f"cannot create maildir {self.path}: {exc}") from exc

    @staticmethod
    def _mkdir_private(path: str, *, parents: bool = False) -> None:
        """mkdir with mode 0700, forcing the mode in case the umask is odd."""
        try:
            if parents:
                os.makedirs(path, mode=0o700)
            else:
                os.mkdir(path, 0o700)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
            return
        os.chmod(path, 0o700)

    def _open_dirs(self, *, create: bool) -> dict[str, int]:
        """Open the Maildir and its new/ and cur/ without following any symlink below root."""
        fds: list[int] = []
        try:
            top, created = self._open_maildir_dir(create, fds)
            dirs = {"": top}
            if created:
                for sub in _LAYOUT_DIRS:
                    os.mkdir(sub, 0o700, dir_fd=top)
            for sub in _MESSAGE_DIRS:
                dirs[sub] = self._open_child(top, sub, f"{self.path}/{sub}", fds, missing="not a maildir")
                if created:
                    os.fchmod(dirs[sub], 0o700)
            if created:
                tmp = self._open_child(top, "tmp", f"{self.path}/tmp", fds, missing="not a maildir")
                os.fchmod(tmp, 0o700)
                fds.remove(tmp)
                os.close(tmp)
            return dirs
        except MailboxError:
            _close_all(fds)
            raise
        except OSError as exc:
            _close_all(fds)
            raise MailboxError(f"cannot open maildir {self.path}: {exc}") from exc
        except BaseException:
            _close_all(fds)
            raise

    def _open_maildir_dir(self, create: bool, fds: list[int]) -> tuple[int, bool]:
        """The Maildir directory's handle, and whether it was just created."""
        if self.root is None:
            try:
                fds.append(os.open(self.path, _DIR_FLAGS))
            except FileNotFoundError:
                raise MailboxError(f"not a maildir (missing): {self.path}") from None
            except OSError as exc:
                if os.path.islink(self.path):
                    self._refuse_link(self.path)
                raise MailboxError(f"cannot open maildir {self.path}: {exc}") from exc
            return fds[-1], False
        rel = os.path.relpath(os.path.normpath(self.path), os.path.normpath(self.root))
        parts = rel.split(os.sep)
        if rel == os.curdir or any(part in ("", os.curdir, os.pardir) for part in parts):
            raise MailboxError(f"maildir {self.path} is not below {self.root}")
        try:
            fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
        except OSError as exc:
            raise MailboxError(f"cannot open the mail root {self.root}: {exc}") from exc
        fds.append(fd)
        shown = self.root
        created = False
        for index, part in enumerate(parts):
            shown = os.path.join(shown, part)
            last = index == len(parts) - 1
            if last and create and not self._exists(fd, part):
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass
            child = self._open_child(fd, part, shown, fds, missing="missing")
            if created:
                os.fchmod(child, 0o700)
            fds.remove(fd)
            os.close(fd)
            fd = child
        return fd, created

    @staticmethod
    def _exists(dir_fd: int, name: str) -> bool:
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _open_child(self, dir_fd: int, name: str, shown: str, fds: list[int], *, missing: str) -> int:
        """Open directory ``name`` in ``dir_fd`` with O_NOFOLLOW; MailboxError naming the problem."""
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            raise MailboxError(f"{missing}: {shown} does not exist (maildir {self.path})") from None
        except OSError as exc:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                self._refuse_link(shown)
            raise MailboxError(f"cannot open {shown} (maildir {self.path}): {exc.strerror or exc}") from exc
        fds.append(fd)
        return fd

    def _refuse_link(self, shown: str) -> None:
        log.warning("refusing mailbox %s: %s is a symbolic link", self.path, shown)
        raise MailboxError(f"refusing maildir {self.path}: {shown} is a symbolic link")

    def close(self) -> None:
        """Release the lock and the directory handles; idempotent."""
        with self._mutex:
            self.unlock()
            dirs, self._dirs = self._dirs, {}
            _close_all(dirs.values())

    def try_close(self) -> bool:
        """:meth:`close` unless another thread uses the handles right now (then False, nothing done):
        closing descriptors and dropping a flock never waits for the disk, so the reactor may."""
        if not self._mutex.acquire(blocking=False):
            return False
        try:
            self.close()
        finally:
            self._mutex.release()
        return True

    def __del__(self) -> None:
        dirs = getattr(self, "_dirs", None)
        if dirs:
            _close_all(dirs.values())

    def _dir(self, sub: str) -> int:
        fd = self._dirs.get(sub)
        if fd is None:
            raise MailboxError(f"maildir is closed: {self.path}")
        return fd

    def lock(self, wait: float = 0.0) -> None:
        """Take the exclusive session lock; MailboxInUse if it is still held elsewhere after
        ``wait`` seconds (polled: BLOCKING for up to that long, so only call it in a thread).

        A short wait serves the client that reconnects the moment its last connection ended:
        the server releases that session's lock in the thread pool when the connection is
        lost, which can come a moment after the client already sees the close.

        flock() locks belong to the open file description, so a second
        Maildir object (even in this process) opens its own and conflicts.
        Calling lock() again on the instance that holds it is a no-op. The
        lock file object closes (and so unlocks) if the instance is garbage
        collected, so a forgotten unlock() cannot wedge the mailbox forever.
        """
        with self._mutex:
            if self._lockfile is not None:
                return
            lockfile = self._open_lock_file()
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(lockfile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        lockfile.close()
                        raise MailboxInUse(f"mailbox is locked: {self.path}") from None
                    time.sleep(_LOCK_POLL)
                except OSError as exc:
                    lockfile.close()
                    raise MailboxError(f"cannot lock {self.path}: {exc}") from exc
            self._lockfile = lockfile

    def _open_lock_file(self) -> BinaryIO:
        """Open/create the lock file without following symlinks."""
        path = os.path.join(self.path, LOCK_NAME)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC
        try:
            fd = os.open(LOCK_NAME, flags, 0o600, dir_fd=self._dir(""))
        except OSError as exc:
            raise MailboxError(f"cannot open lock file {path}: {exc}") from exc
        lockfile = os.fdopen(fd, "r+b", buffering=0)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            lockfile.close()
            raise MailboxError(f"lock file is not a regular file: {path}")
        return lockfile  # type: ignore[return-value]

    def unlock(self) -> None:
        """Release the session lock; idempotent."""
        with self._mutex:
            lockfile, self._lockfile = self._lockfile, None
            if lockfile is not None:
                lockfile.close()  # closing the description drops the flock

    # -- reading --------------------------------------------------------------

    def scan(self) -> list[MessageInfo]:
        """List messages in new/ and cur/, ordered by delivery time then unique name.

        The order depends only on the names (or mtime for odd names), so it is
        the same in every session. A file that vanishes or cannot be read
        during the scan is skipped (and logged); a missing maildir raises
        MailboxError. Only files whose size is neither cached nor given by
        a trustworthy ``,W=`` in the name are read.
        """
        with self._mutex:
            cached = self._cache.mailbox(self._cache_key) if self._cache is not None else {}
            keep: dict[str, tuple[Identity, int]] = {}
            scanned: dict[str, _Scanned] = {}
            found = self._list_messages()
            entries: list[tuple[tuple[int, str], MessageInfo]] = []
            index: dict[str, str] | None = None
            for base, (key, st) in found.items():
                measured = self._measure(key, st, cached)
                if measured is None:
                    # Another agent may have moved it new/ -> cur/ (or re-flagged it).
                    index = self._base_index() if index is None else index
                    moved = index.get(base)
                    if moved is None or moved == key:
                        continue
                    key, measured = moved, self._measure(moved, None, cached)
                    if measured is None:
                        continue
                scanned[key] = measured
                if not measured.from_name:
                    keep[key] = (measured.identity, measured.size)
                info = MessageInfo(key=key, uid=_uid_for(base), size=measured.size, identity=measured.identity)
                entries.append(((_delivery_time(base, st), base), info))
            entries.sort(key=lambda item: item[0])
            self._scanned = scanned
            if self._cache is not None:
                self._cache.store(self._cache_key, keep)
            return [info for _, info in entries]

    def _list_messages(self) -> dict[str, tuple[str, os.stat_result]]:
        """Regular, non-dot files of new/ and cur/ by unique name (cur/ wins)."""
        found: dict[str, tuple[str, os.stat_result]] = {}
        with self._mutex:  # the directory handles' read position is shared
            for sub, name, st in self._iter_files():
                found[_base_name(name)] = (f"{sub}/{name}", st)
        return found

    def _iter_files(self) -> Iterator[tuple[str, str, os.stat_result]]:
        """Yield (subdir, name, lstat) for every candidate message file."""
        for sub in _MESSAGE_DIRS:
            fd = self._dir(sub)
            directory = os.path.join(self.path, sub)
            try:
                if os.fstat(fd).st_nlink == 0:
                    raise MailboxError(f"cannot list {directory}: the directory was removed")
                with os.scandir(fd) as it:
                    names = [entry.name for entry in it]
            except OSError as exc:
                raise MailboxError(f"cannot list {directory}: {exc}") from exc
            for name in names:
                if name.startswith("."):
                    continue
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue  # vanished between readdir and stat
                if stat.S_ISREG(st.st_mode):
                    yield sub, name, st

    def _base_index(self) -> dict[str, str]:
        """Current unique name -> key map, used to follow files other agents moved."""
        return {base: key for base, (key, _) in self._list_messages().items()}

    def _measure(
        self, key: str, st: os.stat_result | None, cached: Mapping[str, tuple[Identity, int]]
    ) -> _Scanned | None:
        """Wire size of ``key``: cached, from its name, or read; None if gone or unreadable."""
        if st is None:
            sub, name = _split_key(key)
            try:
                with self._mutex:
                    st = os.stat(name, dir_fd=self._dir(sub), follow_symlinks=False)
            except (OSError, MailboxError):
                return None
            if not stat.S_ISREG(st.st_mode):
                return None
        identity = _identity(st)
        hit = cached.get(key)
        if hit is not None and hit[0] == identity:
            return _Scanned(identity, hit[1], from_name=False)
        from_name = _size_from_name(key.split("/", 1)[1], st)
        if from_name is not None:
            return _Scanned(identity, from_name, from_name=True)
        try:
            with self._open_regular(key) as fh:
                identity = _identity(os.fstat(fh.fileno()))
                size = wire_size_chunks(iter(lambda: fh.read(_READ_SIZE), b""))
        except FileNotFoundError:
            return None
        except (OSError, MailboxError) as exc:
            log.warning("skipping unreadable message %s in %s: %s", key, self.path, exc)
            return None
        return _Scanned(identity, size, from_name=False)

    def open_message(self, key: str) -> BinaryIO:
        """Open a message for reading (binary, buffered).

        ``key`` must be "new/<name>" or "cur/<name>" (ValueError otherwise).
        If the file was moved new/ -> cur/ or re-flagged by another agent since
        the scan, the file with the same unique name is opened instead; if it
        is gone, FileNotFoundError propagates. Symlinks and non-regular files
        are refused (OSError / MailboxError). A file that is not the one the
        last scan measured (other size, mtime or inode) is refused with
        MessageChanged: its size is no longer the one LIST and RETR announce.
        """
        _, name = _split_key(key)
        opened = key
        try:
            fh = self._open_regular(key)
        except FileNotFoundError:
            moved = self._base_index().get(_base_name(name))
            if moved is None:
                raise
            opened = moved
            fh = self._open_regular(moved)
        try:
            self._check_unchanged(key, opened, fh)
        except BaseException:
            fh.close()
            raise
        return fh

    def _check_unchanged(self, key: str, opened: str, fh: BinaryIO) -> None:
        """MessageChanged unless ``fh`` is the file (and size) the scan promised for ``key``."""
        promised = self._scanned.get(key)
        if promised is None:
            return  # not from a scan of this instance: nothing was promised
        fd = fh.fileno()
        fst = os.fstat(fd)
        identity = _identity(fst)
        if identity != promised.identity:
            log.warning("message %s in %s changed since the scan (%d octets then, %d now)",
                        key, self.path, promised.identity[0], fst.st_size)
            raise MessageChanged(f"message {key} in {self.path} changed since the scan")
        if promised.from_name and fst.st_size and os.pread(fd, 1, fst.st_size - 1) != b"\n":
            # ,W= counts no final line end, but the encoder adds CRLF: the promise is short.
            size = wire_size_chunks(iter(lambda: fh.read(_READ_SIZE), b""))
            if self._cache is not None:
                self._cache.update(self._cache_key, opened, identity, size)
            log.warning("message %s in %s: the size in its name (%d) is not its POP3 size (%d)",
                        key, self.path, promised.size, size)
            raise MessageChanged(f"message {key} in {self.path}: the size in its name is wrong")

    def _open_regular(self, key: str) -> BinaryIO:
        """Open a validated key without following symlinks or blocking on FIFOs."""
        sub, name = _split_key(key)
        path = os.path.join(self.path, key)
        with self._mutex:  # close() cannot free the directory handle while it is in use
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC, dir_fd=self._dir(sub))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MailboxError(f"not a regular file: {path}")
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
            return os.fdopen(fd, "rb")  # type: ignore[return-value]
        except BaseException:
            os.close(fd)
            raise

    # -- writing ------------------------------------------------------------

    def delete(self, keys: Iterable[str]) -> list[str]:
        """The UPDATE step: unlink each marked message; return keys that could not be deleted.

        All keys are validated first (ValueError, nothing deleted) because a
        bad key is a server bug, not a mailbox condition. A file that is
        already gone counts as deleted; if another agent moved or re-flagged
        it, the file with the same unique name is deleted instead, since the
        user asked for that message to go. Directories are fsynced at the end
        so the deletions survive a crash.
        """
        keys = list(keys)
        for key in keys:
            _split_key(key)
        failed: list[str] = []
        touched: set[str] = set()
        index: dict[str, str] | None = None
        for key in keys:
            try:
                if self._unlink(key, touched):
                    continue
                index = self._base_index() if index is None else index
                moved = index.get(_base_name(_split_key(key)[1]))
                if moved is not None and moved != key:
                    self._unlink(moved, touched)
            except (OSError, MailboxError) as exc:
                log.warning("cannot delete %s in %s: %s", key, self.path, exc)
                failed.append(key)
        self._sync_dirs(touched)
        return failed

    def _unlink(self, key: str, touched: set[str]) -> bool:
        """Unlink one message; False if it was already gone."""
        sub, name = _split_key(key)
        try:
            with self._mutex:
                os.unlink(name, dir_fd=self._dir(sub))
        except FileNotFoundError:
            return False
        touched.add(sub)
        return True

    def _sync_dirs(self, subs: Iterable[str]) -> None:
        """fsync the given subdirectories; failures are logged (the unlinks already happened)."""
        for sub in sorted(subs):
            try:
                with self._mutex:
                    os.fsync(self._dir(sub))
            except (OSError, MailboxError) as exc:
                log.warning("cannot fsync %s/%s: %s", self.path, sub, exc)

    def deliver(self, data: bytes) -> str:
        """Store a message the Maildir way (write to tmp/, fsync, link into new/); return its key."""
        for _ in range(_DELIVER_ATTEMPTS):
            name = self._unique_name()
            tmp_path = os.path.join(self.path, "tmp", name)
            new_path = os.path.join(self.path, "new", name)
            try:
                self._write_new_file(tmp_path, data)
            except FileExistsError:
                continue
            try:
                if self._publish(tmp_path, new_path):
                    _fsync_dir(os.path.join(self.path, "new"))
                    return f"new/{name}"
            except BaseException:
                self._discard(tmp_path)
                raise
        raise MailboxError(f"could not find a unique name to deliver into {self.path}")

    @staticmethod
    def _unique_name() -> str:
        """time.M<usec>P<pid>Q<n>.<host>, as the Maildir spec describes."""
        now_us = time.time_ns() // 1000
        seconds, usec = divmod(now_us, 1_000_000)
        counter = next(_delivery_counter)
        return f"{seconds}.M{usec}P{os.getpid()}Q{counter}.{_safe_hostname()}"

    @staticmethod
    def _write_new_file(path: str, data: bytes) -> None:
        """Create ``path`` exclusively and write ``data`` durably."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            Maildir._discard(path)
            raise
        os.close(fd)

    @staticmethod
    def _publish(tmp_path: str, new_path: str) -> bool:
        """Move tmp -> new without ever overwriting; False if the name is taken."""
        try:
            os.link(tmp_path, new_path)
        except FileExistsError:
            Maildir._discard(tmp_path)
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # Filesystem without hard links: rename, after checking the name is free.
            if os.path.lexists(new_path):
                Maildir._discard(tmp_path)
                return False
            os.rename(tmp_path, new_path)
            return True
        Maildir._discard(tmp_path)
        return True

    @staticmethod
    def _discard(path: str) -> None:
        """Best-effort unlink of a temporary file."""
        try:
            os.unlink(path)
        except OSError:
            pass
