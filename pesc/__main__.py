import sys

from pesc.cli import main

sys.exit(main())
