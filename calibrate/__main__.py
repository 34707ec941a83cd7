"""`python -m calibrate` is the `surrogate` command."""

import sys

from calibrate.cli.main import main

sys.exit(main())
