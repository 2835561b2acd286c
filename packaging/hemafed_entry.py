"""Entry point of the bundled executable: the same `hemafed` command line (no arguments on
a desktop opens the app; `hemafed aggregator …`, `hemafed site …` and every other command
run headless from the same executable)."""

import sys

from hemafed.gui.cli import main

if __name__ == "__main__":
    sys.exit(main())
