# SPDX-License-Identifier: GPL-2.0-or-later
"""``python -m topowatch``: the same as the ``topowatch`` command."""

import sys

from topowatch.cli import main

sys.exit(main())
