"""``python -m edgepeft`` runs the CLI."""

import sys

from edgepeft.cli.main import main

sys.exit(main())
