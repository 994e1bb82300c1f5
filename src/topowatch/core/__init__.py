# SPDX-License-Identifier: GPL-2.0-or-later
"""The pure core: topology, FIB, NAT model, decisions. Standard library only.

Nothing in this package performs I/O, reads clocks, spawns tasks or imports a
third-party library; a lint rule enforces it. Callers feed values in and get
decisions out.
"""
