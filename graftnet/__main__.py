import sys

from graftnet.cli import main

sys.exit(main())
