import sys

from spml_fast.cli import main

sys.exit(main())
