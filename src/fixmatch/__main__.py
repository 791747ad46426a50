import sys

from fixmatch.cli import main

sys.exit(main())
