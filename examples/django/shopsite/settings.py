"""Settings of the example site. Every connection comes from the same environment variables as
pgfresh's own flags, so that one environment file configures both sides alike:

- DATABASE_URL: the shop's PostgreSQL database (pgfresh's --database-url).
- REDIS_URL: the Redis pgfresh writes to (pgfresh's --redis-url), the cache's LOCATION.
- PGFRESH_CACHE_KEY_PREFIX, PGFRESH_CACHE_VERSION: the cache's KEY_PREFIX and VERSION (pgfresh's
  --cache-key-prefix and --cache-version). With Django's defaults ("" and 1) nothing needs setting.
"""

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "pgfresh-example-site-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["shop"]
ROOT_URLCONF = "shopsite.urls"
TEMPLATES = [
    {"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True},
]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _database(url):
    """Django's DATABASES entry for a postgres:// URL (what pgfresh's --database-url takes)."""
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or "postgres"),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or 5432),
    }


DATABASES = {
    "default": _database(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    ),
}

# The three settings pgfresh must match: LOCATION (--redis-url), KEY_PREFIX (--cache-key-prefix)
# and VERSION (--cache-version). Django's default KEY_FUNCTION is assumed.
_PGFRESH_CACHE = {
    "LOCATION": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
    "KEY_PREFIX": os.environ.get("PGFRESH_CACHE_KEY_PREFIX", ""),
    "VERSION": int(os.environ.get("PGFRESH_CACHE_VERSION", "1")),
}

CACHES = {
    # Django's own Redis backend: what the site's template tags read through.
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", **_PGFRESH_CACHE},
    # django-redis, the other common backend, on the same keys: the tests read through both.
    "django_redis": {"BACKEND": "django_redis.cache.RedisCache", **_PGFRESH_CACHE},
}

# The tests run against the database above, where pgfresh's listener sees their commits, not
# against a test database of their own.
TEST_RUNNER = "shopsite.testing.ExistingDatabaseRunner"
