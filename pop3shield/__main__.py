"""``python -m pop3shield`` is the ``pop3shield`` command."""

import sys

from pop3shield.cli import main

sys.exit(main())
