"""`python -m fer_pipeline.cli` = `fer`."""

import sys

from fer_pipeline.cli import main

sys.exit(main())
