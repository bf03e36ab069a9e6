import sys

from hdqt.cli import main

sys.exit(main())
