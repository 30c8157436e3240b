"""``python -m predictors.feedback report|compare``: see :mod:`predictors.feedback.cli`."""

import sys

from predictors.feedback.cli import main

sys.exit(main())
