"""python -m textseg ..."""

import sys

from .cli import main

sys.exit(main())
