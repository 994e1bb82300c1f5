#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
# topowatch from its private virtualenv (the Python dependencies ship inside the package).
exec /usr/lib/topowatch/venv/bin/python3 -m topowatch "$@"
