"""``python -m fewstep`` (and ``accelerate launch -m fewstep train RECIPE``) run the command line."""

import sys

from fewstep.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
