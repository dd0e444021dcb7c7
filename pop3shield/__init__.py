"""pop3shield: a hardened POP3 server front-end."""

__version__ = "0.1.0"
