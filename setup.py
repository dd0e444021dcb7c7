"""Package setup; metadata lives in setup.cfg.

The twistd plugin lives in ``twisted/plugins/`` without an ``__init__.py`` (Twisted shares that
directory between projects), so it is listed here explicitly as part of ``twisted.plugins``.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["pop3shield", "pop3shield.*"]) + ["twisted.plugins"])
