"""python -m convert --int8 --run runs/NAME ... ; python -m convert compare --run runs/NAME --bundle models/NAME"""
from __future__ import annotations

import sys

from convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
