# `python -m olavlm ...` runs the olavlm command line.
from olavlm.cli import main

raise SystemExit(main())
