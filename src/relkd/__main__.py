import sys

from relkd.cli import main

sys.exit(main())
