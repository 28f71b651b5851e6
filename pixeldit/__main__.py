import sys

from pixeldit.cli import main

sys.exit(main())
