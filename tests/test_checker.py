"""Tests for pop3shield.checker, run by pytest through twisted.trial's TestCase.

trial's TestCase spins the real global reactor while a returned Deferred is pending, which is
what deferToThreadPool needs (results come back through reactor.callFromThread).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import argon2
import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pop3shield import checker as checker_module
from pop3shield.checker import AddressedCredentials, LoginDisabled, PasswdFileChecker
from pop3shield.passwd import DUMMY_ENTRY, PasswdEntry, PasswdError

FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "correct horse:battery"


def argon2_line(user: str, password: str) -> str:
    return f"{user}:{{ARGON2ID}}{FAST_ARGON2.hash(password)}"


class _Base(unittest.TestCase):
    """A temporary passwd file, a started private thread pool, and a cleaned-up checker."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(_rmtree, self.dir)
        self.path = self.dir / "users.passwd"
        self.write(argon2_line("alice", PASSWORD), argon2_line("bob", "b0b"))
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="test-checker")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def write(self, *lines: str) -> None:
        """Replace the file atomically (as operators' tools do) with new content."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, self.path)

    def make(self, **kwargs: Any) -> PasswdFileChecker:
        kwargs.setdefault("threadpool", self.pool)
        kwargs.setdefault("reactor", reactor)
        return PasswdFileChecker(str(self.path), **kwargs)

    async def assert_unauthorized(self, checker: PasswdFileChecker, creds: Any) -> UnauthorizedLogin:
        try:
            result = await checker.requestAvatarId(creds)
        except UnauthorizedLogin as error:
            return error
        self.fail(f"expected UnauthorizedLogin, got {result!r}")


def _rmtree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


class InterfaceTests(_Base):
    def test_provides_checker_interface(self) -> None:
        checker = self.make()
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertEqual(checker.credentialInterfaces, (IUsernamePassword, IUsernameHashedPassword))
        self.assertEqual(checker.users, frozenset({"alice", "bob"}))

    def test_bad_file_raises_at_construction(self) -> None:
        self.write("alice:{MD5}x")
        self.assertRaises(PasswdError, self.make)

    def test_missing_file_raises_at_construction(self) -> None:
        self.path.unlink()
        error = self.assertRaises(PasswdError, self.make)
        self.assertIn("cannot read", str(error))

    def test_plaintext_needs_opt_in(self) -> None:
        self.write("carol:{PLAIN}pw")
        self.assertRaises(PasswdError, self.make)
        self.assertEqual(self.make(allow_plaintext=True).users, frozenset({"carol"}))


class VerificationTests(_Base):
    @defer.inlineCallbacks
    def test_success_returns_username_bytes(self) -> Any:
        checker = self.make()
        avatar = yield checker.requestAvatarId(UsernamePassword(b"alice", PASSWORD.encode()))
        self.assertEqual(avatar, b"alice")

    @defer.inlineCallbacks
    def test_str_credentials_are_normalised(self) -> Any:
        checker = self.make()
        avatar = yield checker.requestAvatarId(UsernamePassword("alice", PASSWORD))
        self.assertEqual(avatar, b"alice")

    @defer.inlineCallbacks
    def test_non_ascii_user(self) -> Any:
        self.write(argon2_line("jürgen", "pä"))
        checker = self.make()
        avatar = yield checker.requestAvatarId(UsernamePassword("jürgen".encode(), "pä".encode()))
        self.assertEqual(avatar, "jürgen".encode())
        self.assertIsInstance(avatar, bytes)

    async def test_wrong_password(self) -> None:
        checker = self.make()
        await self.assert_unauthorized(checker, UsernamePassword(b"alice", b"wrong"))

    async def test_other_users_password(self) -> None:
        checker = self.make()
        await self.assert_unauthorized(checker, UsernamePassword(b"alice", b"b0b"))

    async def test_unknown_user(self) -> None:
        checker = self.make()
        await self.assert_unauthorized(checker, UsernamePassword(b"mallory", PASSWORD.encode()))

    async def test_undecodable_user(self) -> None:
        checker = self.make()
        await self.assert_unauthorized(checker, UsernamePassword(b"\xffalice", PASSWORD.encode()))

    async def test_empty_credentials(self) -> None:
        checker = self.make()
        await self.assert_unauthorized(checker, UsernamePassword(b"", b""))

    async def test_username_is_case_sensitive(self) -> None:
        checker = self.make()
        await self.assert_unauthorized(checker, UsernamePassword(b"Alice", PASSWORD.encode()))

    async def test_same_error_for_unknown_user_and_wrong_password(self) -> None:
        checker = self.make()
        unknown = await self.assert_unauthorized(checker, UsernamePassword(b"nobody", b"x"))
        wrong = await self.assert_unauthorized(checker, UsernamePassword(b"alice", b"x"))
        self.assertEqual(str(unknown), str(wrong))

    async def test_errors_never_contain_password_or_hash(self) -> None:
        checker = self.make()
        hashes = [entry.hash for entry in checker._state[0].values()]
        for creds in (UsernamePassword(b"alice", b"hunter2-wrong"), UsernamePassword(b"x", b"hunter2-x")):
            error = await self.assert_unauthorized(checker, creds)
            text = f"{error!s} {error!r} {error.args!r}"
            self.assertNotIn("hunter2", text)
            for hashed in hashes:
                self.assertNotIn(hashed, text)

    @defer.inlineCallbacks
    def test_plaintext_and_bcrypt(self) -> Any:
        bc = bcrypt.hashpw(b"bpw", bcrypt.gensalt(4)).decode()
        self.write("carol:{PLAIN}ppw", f"dave:{{BLF-CRYPT}}{bc}")
        checker = self.make(allow_plaintext=True)
        self.assertEqual((yield checker.requestAvatarId(UsernamePassword(b"carol", b"ppw"))), b"carol")
        self.assertEqual((yield checker.requestAvatarId(UsernamePassword(b"dave", b"bpw"))), b"dave")
        yield self.assertFailure(checker.requestAvatarId(UsernamePassword(b"carol", b"bpw")), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_apop_digest_against_plaintext_entry(self) -> Any:
        """APOP (RFC 1939): MD5(challenge + password), answerable only by a {PLAIN} entry."""
        from pop3shield.credentials import APOPCredentials

        bc = bcrypt.hashpw(b"bpw", bcrypt.gensalt(4)).decode()
        self.write("carol:{PLAIN}ppw", f"dave:{{BLF-CRYPT}}{bc}")
        checker = self.make(allow_plaintext=True)
        challenge = b"<1896.697170952@dbc.mtview.ca.us>"

        def apop(user: bytes, password: bytes) -> APOPCredentials:
            digest = hashlib.md5(challenge + password).hexdigest().encode()
            return APOPCredentials(user, challenge, digest)

        self.assertEqual((yield checker.requestAvatarId(apop(b"carol", b"ppw"))), b"carol")
        yield self.assertFailure(checker.requestAvatarId(apop(b"carol", b"wrong")), UnauthorizedLogin)
        yield self.assertFailure(checker.requestAvatarId(apop(b"dave", b"bpw")), UnauthorizedLogin)
        yield self.assertFailure(checker.requestAvatarId(apop(b"nobody", b"x")), UnauthorizedLogin)

    def test_rfc1939_apop_example_digest(self) -> None:
        from pop3shield.credentials import APOPCredentials

        creds = APOPCredentials(b"mrose", b"<1896.697170952@dbc.mtview.ca.us>",
                                b"c4c9334bac560ecc979e58001b3e22fb")
        self.assertTrue(creds.checkPassword(b"tanstaaf"))
        self.assertFalse(creds.checkPassword(b"tanstaaF"))

    @defer.inlineCallbacks
    def test_portal_integration(self) -> Any:
        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatarId: bytes, mind: Any, *interfaces: Any) -> Any:
                return interfaces[0], avatarId, lambda: None

        portal = Portal(Realm(), [self.make()])
        iface, avatar, _logout = yield portal.login(
            UsernamePassword(b"bob", b"b0b"), None, IUsernamePassword
        )
        self.assertEqual(avatar, b"bob")

    @defer.inlineCallbacks
    def test_default_threadpool_is_the_reactors(self) -> Any:
        checker = PasswdFileChecker(str(self.path))  # global reactor and its thread pool
        avatar = yield checker.requestAvatarId(UsernamePassword(b"bob", b"b0b"))
        self.assertEqual(avatar, b"bob")

    @defer.inlineCallbacks
    def test_verification_runs_off_the_reactor_thread(self) -> Any:
        threads: list[threading.Thread] = []
        real = checker_module.verify_password

        def spy(entry: PasswdEntry, password: bytes) -> bool:
            threads.append(threading.current_thread())
            return real(entry, password)

        self.patch(checker_module, "verify_password", spy)
        yield self.make().requestAvatarId(UsernamePassword(b"bob", b"b0b"))
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())


class TimingOracleTests(_Base):
    def spy(self) -> list[tuple[PasswdEntry, bytes]]:
        calls: list[tuple[PasswdEntry, bytes]] = []
        real = checker_module.verify_password

        def spy(entry: PasswdEntry, password: bytes) -> bool:
            calls.append((entry, password))
            return real(entry, password)

        self.patch(checker_module, "verify_password", spy)
        return calls

    async def test_unknown_user_still_verifies_a_hash_of_the_same_cost(self) -> None:
        calls = self.spy()
        checker = self.make()
        await self.assert_unauthorized(checker, UsernamePassword(b"mallory", b"guess"))
        self.assertEqual(len(calls), 1)
        entry, password = calls[0]
        self.assertEqual(password, b"guess")
        self.assertEqual(entry.scheme, "ARGON2ID")
        self.assertEqual(entry.user, "")
        real_params = argon2.extract_parameters(checker._state[0]["alice"].hash)
        dummy_params = argon2.extract_parameters(entry.hash)
        self.assertEqual(dummy_params, real_params)

    async def test_known_user_verifies_exactly_once(self) -> None:
        calls = self.spy()
        await self.assert_unauthorized(self.make(), UsernamePassword(b"alice", b"guess"))
        self.assertEqual([entry.user for entry, _ in calls], ["alice"])

    async def test_bcrypt_file_gets_a_bcrypt_dummy(self) -> None:
        bc = bcrypt.hashpw(b"x", bcrypt.gensalt(5)).decode()
        self.write(f"dave:{{BLF-CRYPT}}{bc}")
        calls = self.spy()
        await self.assert_unauthorized(self.make(), UsernamePassword(b"mallory", b"guess"))
        self.assertTrue(calls[0][0].hash.startswith("$2b$05$"))

    async def test_empty_file_uses_default_dummy(self) -> None:
        self.write("# nobody yet")
        calls = self.spy()
        await self.assert_unauthorized(self.make(), UsernamePassword(b"mallory", b"guess"))
        self.assertIs(calls[0][0], DUMMY_ENTRY)


class ReloadTests(_Base):
    def setUp(self) -> None:
        super().setUp()
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.logged if e.get("log_level") and e["log_level"].name == "error"]

    async def login(self, checker: PasswdFileChecker, user: bytes, password: bytes) -> bytes:
        return await checker.requestAvatarId(UsernamePassword(user, password))

    async def test_reload_on_replace(self) -> None:
        checker = self.make()
        await self.assert_unauthorized(checker, UsernamePassword(b"carol", b"new"))
        self.write(argon2_line("alice", PASSWORD), argon2_line("carol", "new"))
        self.assertEqual(await self.login(checker, b"carol", b"new"), b"carol")
        await self.assert_unauthorized(checker, UsernamePassword(b"bob", b"b0b"))

    async def test_reload_on_in_place_rewrite_with_new_size(self) -> None:
        checker = self.make()
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(argon2_line("carol", "new") + "\n")
        self.assertEqual(await self.login(checker, b"carol", b"new"), b"carol")

    async def test_reload_on_same_size_new_mtime(self) -> None:
        self.write("carol:{PLAIN}aaaa")
        checker = self.make(allow_plaintext=True)
        stat = os.stat(self.path)
        with open(self.path, "r+", encoding="utf-8") as handle:
            handle.write("carol:{PLAIN}bbbb\n")
        os.utime(self.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        self.assertEqual(os.stat(self.path).st_size, stat.st_size)
        self.assertEqual(await self.login(checker, b"carol", b"bbbb"), b"carol")
        await self.assert_unauthorized(checker, UsernamePassword(b"carol", b"aaaa"))

    async def test_no_reload_when_unchanged(self) -> None:
        checker = self.make()
        loads: list[str] = []
        real = checker_module.load_passwd
        self.patch(checker_module, "load_passwd", lambda *a, **k: loads.append("x") or real(*a, **k))
        for _ in range(3):
            self.assertEqual(await self.login(checker, b"bob", b"b0b"), b"bob")
        self.assertEqual(loads, [])

    async def test_broken_update_keeps_old_users_and_logs_once(self) -> None:
        checker = self.make()
        self.write(argon2_line("carol", "new"), "broken line without scheme:hunter2")
        self.assertEqual(await self.login(checker, b"alice", PASSWORD.encode()), b"alice")
        self.assertEqual(await self.login(checker, b"bob", b"b0b"), b"bob")
        await self.assert_unauthorized(checker, UsernamePassword(b"carol", b"new"))
        errors = self.errors()
        self.assertEqual(len(errors), 1)
        text = repr(errors[0])
        self.assertIn(":2:", text)
        self.assertNotIn("hunter2", text)
        # fixed: picked up on the next request
        self.write(argon2_line("carol", "new"))
        self.assertEqual(await self.login(checker, b"carol", b"new"), b"carol")
        await self.assert_unauthorized(checker, UsernamePassword(b"alice", PASSWORD.encode()))

    async def test_deleted_file_keeps_old_users_and_logs_once(self) -> None:
        checker = self.make()
        self.path.unlink()
        self.assertEqual(await self.login(checker, b"bob", b"b0b"), b"bob")
        self.assertEqual(await self.login(checker, b"bob", b"b0b"), b"bob")
        self.assertEqual(len(self.errors()), 1)
        self.write(argon2_line("erin", "e"))
        self.assertEqual(await self.login(checker, b"erin", b"e"), b"erin")

    async def test_reload_logs_no_secrets(self) -> None:
        checker = self.make()
        self.write(argon2_line("carol", "hunter2"))
        self.assertEqual(await self.login(checker, b"carol", b"hunter2"), b"carol")
        for event in self.logged:
            self.assertNotIn("hunter2", repr(event))
            self.assertNotIn("$argon2id$", repr(event))


class ExtraFieldPolicyTests(_Base):
    """Dovecot extra fields: checked after the password, in Dovecot's order, with no oracle."""

    def setUp(self) -> None:
        super().setUp()
        self.write(
            argon2_line("dis1", "pw") + "::::::nologin",
            argon2_line("why", "pw") + "::::::nologin reason=Moved_to_pop.example.org nodelay",
            argon2_line("dis2", "pw") + "::::::allow_nets=10.0.0.0/8",
            argon2_line("lo", "pw") + "::::::allow_nets=127.0.0.0/8",
            argon2_line("sock", "pw") + "::::::allow_nets=local",
            argon2_line("both", "pw") + "::::::nologin reason=Closed allow_nets=10.0.0.0/8",
            argon2_line("gone", "pw") + "::::::fail",
            "plain:{PLAIN}pw::::::allow_nets=192.0.2.0/24 nologin reason=Read_only",
            "plainsock:{PLAIN}pw::::::allow_nets=local",
        )

    def creds(self, user: str, password: str = "pw", address: Any = "127.0.0.1") -> AddressedCredentials:
        return AddressedCredentials(user.encode(), password.encode(), address)

    async def refused(self, checker: PasswdFileChecker, creds: Any) -> UnauthorizedLogin:
        return await self.assert_unauthorized(checker, creds)

    async def test_nologin_refuses_a_right_password_with_the_reason(self) -> None:
        checker = self.make(allow_plaintext=True)
        error = await self.refused(checker, self.creds("dis1"))
        self.assertIsInstance(error, LoginDisabled)
        self.assertEqual((error.reason, error.nodelay), (None, False))
        error = await self.refused(checker, self.creds("why"))
        self.assertIsInstance(error, LoginDisabled)
        self.assertEqual((error.reason, error.nodelay), ("Moved_to_pop.example.org", True))

    async def test_nologin_with_a_wrong_password_is_an_ordinary_failure(self) -> None:
        """No oracle: neither the reason nor nodelay reach someone who does not know the password."""
        checker = self.make(allow_plaintext=True)
        wrong = await self.refused(checker, self.creds("why", "guess"))
        unknown = await self.refused(checker, self.creds("nosuchuser", "guess"))
        for error in (wrong, unknown):
            self.assertNotIsInstance(error, LoginDisabled)
            self.assertEqual(str(error), str(await self.refused(checker, self.creds("lo", "guess"))))

    async def test_allow_nets_refuses_other_addresses_like_a_wrong_password(self) -> None:
        checker = self.make(allow_plaintext=True)
        self.assertEqual(await checker.requestAvatarId(self.creds("lo")), b"lo")
        self.assertEqual(await checker.requestAvatarId(self.creds("lo", address="::ffff:127.0.0.1")), b"lo")
        self.assertEqual(await checker.requestAvatarId(self.creds("dis2", address="10.9.8.7")), b"dis2")
        wrong_password = await self.refused(checker, self.creds("lo", "guess"))
        for creds in (self.creds("dis2"), self.creds("lo", address="192.0.2.1"), self.creds("lo", address=None),
                      self.creds("lo", address="garbage"), UsernamePassword(b"lo", b"pw")):
            error = await self.refused(checker, creds)
            self.assertNotIsInstance(error, LoginDisabled)
            self.assertEqual(str(error), str(wrong_password))

    async def test_local_matches_only_a_connection_without_an_ip_address(self) -> None:
        checker = self.make(allow_plaintext=True)
        self.assertEqual(await checker.requestAvatarId(self.creds("sock", address=None)), b"sock")
        await self.refused(checker, self.creds("sock"))
        await self.refused(checker, UsernamePassword(b"sock", b"pw"))  # address unknown

    async def test_allow_nets_is_checked_before_nologin(self) -> None:
        """As in Dovecot: from a refused network even the nologin reason is not shown."""
        checker = self.make(allow_plaintext=True)
        outside = await self.refused(checker, self.creds("both"))
        self.assertNotIsInstance(outside, LoginDisabled)
        inside = await self.refused(checker, self.creds("both", address="10.0.0.1"))
        self.assertIsInstance(inside, LoginDisabled)
        self.assertEqual(inside.reason, "Closed")

    async def test_fail_is_refused_like_a_wrong_password(self) -> None:
        error = await self.refused(self.make(allow_plaintext=True), self.creds("gone"))
        self.assertIsInstance(error, LoginDisabled)
        self.assertEqual((error.reason, error.nodelay), (None, False))

    async def test_every_refusal_costs_exactly_one_verification(self) -> None:
        calls: list[str] = []
        real = checker_module.verify_password
        self.patch(checker_module, "verify_password", lambda e, p: calls.append(e.user) or real(e, p))
        checker = self.make(allow_plaintext=True)
        for creds in (self.creds("dis1"), self.creds("dis2"), self.creds("lo"), self.creds("dis1", "x")):
            try:
                await checker.requestAvatarId(creds)
            except UnauthorizedLogin:
                pass
        self.assertEqual(calls, ["dis1", "dis2", "lo", "dis1"])

    async def test_apop_obeys_the_same_policy(self) -> None:
        from pop3shield.credentials import APOPCredentials

        checker = self.make(allow_plaintext=True)
        challenge = b"<1.2@test>"
        digest = hashlib.md5(challenge + b"pw").hexdigest().encode()
        inside = await self.refused(checker, APOPCredentials(b"plain", challenge, digest, "192.0.2.9"))
        self.assertIsInstance(inside, LoginDisabled)
        self.assertEqual(inside.reason, "Read_only")
        outside = await self.refused(checker, APOPCredentials(b"plain", challenge, digest, "127.0.0.1"))
        self.assertNotIsInstance(outside, LoginDisabled)
        unknown = await self.refused(checker, APOPCredentials(b"plain", challenge, digest))
        self.assertNotIsInstance(unknown, LoginDisabled)
        self.assertEqual(await checker.requestAvatarId(APOPCredentials(b"plainsock", challenge, digest, None)),
                         b"plainsock")
        await self.refused(checker, APOPCredentials(b"plainsock", challenge, digest))  # address not given

    async def test_nologin_added_while_running_takes_effect_on_the_next_login(self) -> None:
        checker = self.make(allow_plaintext=True)
        self.write("carol:{PLAIN}pw")
        self.assertEqual(await checker.requestAvatarId(self.creds("carol")), b"carol")
        self.write("carol:{PLAIN}pw::::::nologin")
        self.assertIsInstance(await self.refused(checker, self.creds("carol")), LoginDisabled)
        self.write("carol:{PLAIN}pw::::::nopassword")  # refused at load: the last good table stays
        self.assertIsInstance(await self.refused(checker, self.creds("carol")), LoginDisabled)

    def test_credentials_repr_hides_the_password(self) -> None:
        creds = self.creds("lo", "hunter2")
        self.assertTrue(IUsernamePassword.providedBy(creds))
        self.assertTrue(creds.checkPassword(b"hunter2"))
        self.assertNotIn("hunter2", repr(creds))
        self.assertEqual(creds.client_address, "127.0.0.1")

    async def test_load_logs_the_policy_counts_and_refusals_without_secrets(self) -> None:
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        checker = self.make(allow_plaintext=True)
        await self.refused(checker, self.creds("dis2", "pw"))
        texts = [e.get("log_format", "").format(**e) for e in logged if "log_format" in e]
        self.assertIn(f"{self.path}: 5 users with nologin, 6 with allow_nets", texts)
        self.assertIn("login refused for user=dis2 from 127.0.0.1: address not in allow_nets", texts)
        for event in logged:
            self.assertNotIn("$argon2id$", repr(event))
