import sys

from clawrouter.cli import main

sys.exit(main())
