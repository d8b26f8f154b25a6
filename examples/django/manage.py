#!/usr/bin/env python3
"""The Django example's command line: `runserver` to see the shop. Its tests change the database
they run against, so `cargo test --test django` runs them, on a database of their own."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shopsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
