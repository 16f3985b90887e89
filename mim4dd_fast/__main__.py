"""`python -m mim4dd_fast ...` (what `torchrun ... -m mim4dd_fast ...` runs): the same CLI as `mim4dd-fast`."""

import sys

from .cli import main

sys.exit(main())
