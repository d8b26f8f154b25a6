"""A test runner for tests that must commit where pgfresh listens."""

from django.test.runner import DiscoverRunner


class ExistingDatabaseRunner(DiscoverRunner):
    """Runs the tests against the database the settings name, not a test database Django creates:
    pgfresh's listener watches the shop's own tables, so the tests' commits must land there."""

    def setup_databases(self, **kwargs):
        return None

    def teardown_databases(self, old_config, **kwargs):
        pass
