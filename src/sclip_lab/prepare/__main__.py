"""``python -m sclip_lab.prepare``: see ``sclip_lab.prepare.cli``."""

import logging
import sys

from sclip_lab.prepare import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
