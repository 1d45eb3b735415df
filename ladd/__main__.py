import sys

from ladd.cli import main

sys.exit(main())
