"""`python -m lionmq.cli`, the same as the `lionmq` script."""

import sys

from lionmq.cli.main import main

sys.exit(main())
