# `python -m olavlm.train ...` (what torchrun launches): the same as `olavlm train ...`.
from olavlm.train.cli import main

raise SystemExit(main())
