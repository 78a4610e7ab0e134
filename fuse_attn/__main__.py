"""`python -m fuse_attn ...`: the same as the `fuse-attn` command."""

import sys

from fuse_attn.commands.cli import main

sys.exit(main())
