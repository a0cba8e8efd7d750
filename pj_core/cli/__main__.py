import sys

from pj_core.cli import main

sys.exit(main())
