"""python -m central: the central collector (central/collector.py; also the console script sem-collect)."""
import sys

from central.collector import main

sys.exit(main())
