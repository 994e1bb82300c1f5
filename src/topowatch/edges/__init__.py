# SPDX-License-Identifier: GPL-2.0-or-later
"""Edges: the narrow interfaces to the kernel and the outside world, each with a fake for tests."""
