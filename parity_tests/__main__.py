"""``python -m parity_tests [--out DIR] [--update-results]``: print and save the parity
report (see ``report.py``)."""

import sys

from parity_tests import report

sys.exit(report.main())
