import sys

from hemafed.gui.cli import main

sys.exit(main())
