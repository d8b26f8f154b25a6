"""A test runner for tests that must commit where pgfresh listens."""

import os

from django.core.exceptions import ImproperlyConfigured
from django.test.runner import DiscoverRunner


class ExistingDatabaseRunner(DiscoverRunner):
    """Runs the tests against the database the settings name, not a test database Django creates:
    pgfresh's listener watches the shop's own tables, so the tests' commits must land there. They
    change and delete rows, so only tests/django.rs runs them, on a database made for them."""

    def setup_databases(self, **kwargs):
        if not os.environ.get("PGFRESH_SHOP_BINARY"):
            raise ImproperlyConfigured(
                "these tests change the database they run against and need pgfresh's listener on "
                "it: run them with `cargo test --test django`, which makes a database for them"
            )
        return None

    def teardown_databases(self, old_config, **kwargs):
        pass
