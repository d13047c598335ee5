"""`python -m circuits` (and `torchrun ... -m circuits`): the command line."""

from circuits.cli import main

raise SystemExit(main())
