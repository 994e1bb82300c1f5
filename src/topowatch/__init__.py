# SPDX-License-Identifier: GPL-2.0-or-later
"""topowatch: delete exactly the conntrack entries a topology change left stale."""

__version__ = "0.1.0"
