"""``python -m orchestrator.cli``: the ``medtriage`` command."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
