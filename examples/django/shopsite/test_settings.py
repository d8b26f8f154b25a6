"""Settings for the example's own tests, which tests/django.rs runs (`cargo test --test django`):
against the database it made for them, where pgfresh's listener sees their commits."""

from .settings import *  # noqa: F401,F403

TEST_RUNNER = "shopsite.testing.ExistingDatabaseRunner"
