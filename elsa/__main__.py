"""``python3 -m elsa``: the ``elsa`` reports command, for a checkout that is not
installed (the installed ``elsa`` script runs the same main)."""

import sys

from elsa.report.cli import main

sys.exit(main())
