"""Settings of the example site. Every connection comes from the same environment variables as
pgfresh's own flags, so that one environment file configures both sides alike:

- DATABASE_URL: the shop's PostgreSQL database (pgfresh's --database-url).
- REDIS_URL: the Redis pgfresh writes to (pgfresh's --redis-url), the cache's LOCATION.
- PGFRESH_CACHE_KEY_PREFIX, PGFRESH_CACHE_VERSION: the cache's KEY_PREFIX and VERSION (pgfresh's
  --cache-key-prefix and --cache-version). With Django's defaults ("" and 1) nothing needs setting.
- PGFRESH_SERVE_URL, PGFRESH_SERVE_TOKEN: where pgfresh's listener answers misses (its --serve
  address, http://127.0.0.1:9188 unless set, and its --serve-token); PGFRESH_SERVE_TIMEOUT: how long
  a miss waits for it, in seconds (0.2 unless set).
- DJANGO_SECRET_KEY: the site's secret; without it, a random one for this process (the example
  keeps no sessions, so nothing outlives it). DJANGO_DEBUG=1: Django's debug pages, for
  development on your own machine only (they show settings and source to whoever asks).
"""

import os
import secrets
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50)
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["shop"]
ROOT_URLCONF = "shopsite.urls"
TEMPLATES = [
    {"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True},
]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _database(url):
    """Django's DATABASES entry for a postgres:// URL (what pgfresh's --database-url takes; its
    libpq key=value form is not read here). Query parameters (sslmode, sslrootcert, ...) pass to
    psycopg as they are, so both sides connect alike."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("DATABASE_URL must be a postgres:// URL for this example site")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or "postgres"),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or 5432),
        "OPTIONS": dict(parse_qsl(parts.query)),
    }


DATABASES = {
    "default": _database(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    ),
}

# The three settings pgfresh must match: LOCATION (--redis-url), KEY_PREFIX (--cache-key-prefix)
# and VERSION (--cache-version). pgfresh writes with Django's default KEY_FUNCTION and pickle
# serializer: keep those (django-redis's JSON or msgpack serializers cannot read its entries).
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

# pgfresh's fragment server (listen --serve): the product_card tag asks it on a cache miss.
PGFRESH_SERVE_URL = os.environ.get("PGFRESH_SERVE_URL", "http://127.0.0.1:9188")
PGFRESH_SERVE_TOKEN = os.environ.get("PGFRESH_SERVE_TOKEN", "")
PGFRESH_SERVE_TIMEOUT = float(os.environ.get("PGFRESH_SERVE_TIMEOUT", "0.2"))
