"""``python -m diffcom ...`` (and ``torchrun -m diffcom train ...``) runs the ``diffcom`` command."""

import sys

from diffcom.cli import main

sys.exit(main())
