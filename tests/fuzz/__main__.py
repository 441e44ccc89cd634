"""python -m tests.fuzz: see tests/fuzz/runner.py."""

import sys

from .runner import main

sys.exit(main())
