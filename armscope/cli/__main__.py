"""``python -m armscope.cli``: the same as the ``armscope`` console script."""
import sys

from armscope.cli import main

sys.exit(main())
