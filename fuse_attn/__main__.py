"""`python -m fuse_attn ...`: the same as the `fuse-attn` command."""

import sys

from fuse_attn.cli import main

sys.exit(main())
