"""twistd plugin: ``twistd -n pop3shield --config FILE``.

This directory must not contain an ``__init__.py``: Twisted collects plugins from it as a
namespace shared with other packages.
"""

from __future__ import annotations

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [["config", "c", None, "TOML config file (see etc/pop3shield.toml)"]]

    def postOptions(self) -> None:
        """Config errors stop start-up here, as a usage error naming file, key and problem."""
        from pop3shield.config import ConfigError, load_config
        from pop3shield.passwd import PasswdError
        from pop3shield.service import preflight

        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self["loaded"] = load_config(self["config"])
            self["preflight"] = preflight(self["loaded"])
        except (ConfigError, PasswdError) as exc:
            raise usage.UsageError(str(exc)) from None


@implementer(IServiceMaker, IPlugin)
class Pop3ShieldServiceMaker:
    tapname = "pop3shield"
    description = "pop3shield: a hardened POP3 server front-end"
    options = Options

    def makeService(self, options: Options):  # type: ignore[no-untyped-def]
        """twistd owns the log observers (--logfile); stdlib logging is bridged into them, every
        event's text fields are escaped before they reach them, and the preflight warnings are
        logged (twistd replays them once its log starts). SIGHUP and SIGTERM are the server's own, as
        under ``pop3shield run``."""
        from pop3shield.logsetup import install_field_escaper, install_stdlib_bridge
        from pop3shield.service import log_warnings, make_service

        install_stdlib_bridge(options["loaded"].logging.level)
        install_field_escaper()
        log_warnings(options["preflight"])
        return make_service(options["loaded"], signals=True)  # SIGHUP reloads, SIGTERM's grace period


serviceMaker = Pop3ShieldServiceMaker()
