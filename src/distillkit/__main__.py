"""`python -m distillkit` is the same as the `distillkit` command (torchrun -m distillkit ...)."""

import sys

from distillkit.cli import main

sys.exit(main())
