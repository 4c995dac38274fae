import sys

from vtw_core.cli import main

sys.exit(main())
