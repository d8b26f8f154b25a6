"""What a Django site relies on when pgfresh fills its cache: `cache.get` and `cache.get_many`
return, through both common Redis backends, exactly what the template would render live; a commit
is what the next `cache.get` returns; deletes and pgfresh's sweep behave in Django's format.

These tests need pgfresh's listener running on the same database and Redis, in Django's format with
this site's KEY_PREFIX and VERSION, and the shop set up with hostile text in it: tests/django.rs
arranges all of that (`cargo test --test django`). PGFRESH_SHOP_BINARY names the shop binary, for
the sweep test.
"""

import os
import subprocess
import sys
import time

from django.core.cache import caches
from django.template import Context, Template
from django.test import SimpleTestCase
from django.utils.safestring import SafeData

from .models import Product, Review
from .templatetags.shop_tags import VARIANTS, card_key, product_card

BACKENDS = ("default", "django_redis")

# How long pgfresh may take: generous, for a loaded 2-core machine (it takes milliseconds).
PATIENCE = 30.0


def eventually(what, condition):
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for {}".format(what))
        time.sleep(0.02)


def live(product_id, variant):
    """What the tag renders on a miss, from the database as it is now."""
    return product_card(Product.objects.get(pk=product_id), variant, use_cache=False)


class CacheGetReturnsWhatPgfreshWrote(SimpleTestCase):
    databases = {"default"}

    def test_every_hit_is_exactly_what_a_miss_renders(self):
        products = list(Product.objects.order_by("pk"))
        self.assertGreaterEqual(len(products), 50)
        hostile = [p for p in products if any(c in p.name for c in "<&\"'") or not p.name.isascii()]
        self.assertGreaterEqual(len(hostile), 2, "the harness put hostile names in")
        for product in products:
            for variant in VARIANTS:
                expected = product_card(product, variant, use_cache=False)
                for backend in BACKENDS:
                    hit = caches[backend].get(card_key(product.pk, variant))
                    self.assertEqual(hit, expected, (backend, product.pk, variant))
                    # Marked safe, as Django's own cache.set of a rendered template stores it: a
                    # tag returning it is not escaped again.
                    self.assertIsInstance(hit, SafeData)

    def test_a_template_shows_the_same_card_on_a_hit_and_on_a_miss(self):
        hit = Template('{% load shop_tags %}{% product_card product "full" %}')
        miss = Template('{% load shop_tags %}{% product_card product "full" use_cache=False %}')
        for product in Product.objects.order_by("pk")[:10]:
            context = Context({"product": product})
            shown = hit.render(context)
            self.assertTrue(shown.startswith('<article class="product-card full"'), shown)
            self.assertEqual(shown, miss.render(context))

    def test_get_many_returns_every_card(self):
        ids = list(Product.objects.order_by("pk").values_list("pk", flat=True)[:40])
        keys = [card_key(i, v) for i in ids for v in VARIANTS]
        expected = {card_key(i, v): live(i, v) for i in ids for v in VARIANTS}
        for backend in BACKENDS:
            self.assertEqual(caches[backend].get_many(keys), expected, backend)

    def test_a_committed_change_is_what_the_next_get_returns(self):
        product = Product.objects.get(pk=7)
        product.price_cents += 1234
        product.name = "Renamed: l'été & <co>"
        product.save(update_fields=["price_cents", "name"])
        Review.objects.create(product=product, author="Zoë", rating=4, body='"Fresh" ✓')
        for variant in VARIANTS:
            expected = live(7, variant)
            self.assertIn("Renamed: l'été &amp; &lt;co&gt;", expected)
            for backend in BACKENDS:
                key = card_key(7, variant)
                eventually(
                    "{} in {} to show the change".format(key, backend),
                    lambda: caches[backend].get(key) == expected,
                )

    def test_a_deleted_product_leaves_the_cache(self):
        Product.objects.get(pk=9).delete()
        for variant in VARIANTS:
            for backend in BACKENDS:
                key = card_key(9, variant)
                eventually(
                    "{} to leave {}".format(key, backend),
                    lambda: caches[backend].get(key) is None,
                )

    def test_a_miss_renders_live_and_stores_nothing(self):
        key = card_key(11, "compact")
        caches["default"].delete(key)
        product = Product.objects.get(pk=11)
        self.assertEqual(product_card(product, "compact"), live(11, "compact"))
        self.assertIsNone(caches["default"].get(key), "the tag must not cache.set")
        # Any change to the product brings the card back, written by pgfresh.
        Product.objects.filter(pk=11).update(price_cents=product.price_cents + 1)
        eventually(key + " to be back", lambda: caches["default"].get(key) == live(11, "compact"))

    def test_the_sweep_repairs_and_deletes_in_djangos_format(self):
        binary = os.environ.get("PGFRESH_SHOP_BINARY")
        if not binary:
            self.skipTest("PGFRESH_SHOP_BINARY is not set")
        cache = caches["default"]
        cache.set(card_key(3, "full"), "written by someone else")
        cache.set(card_key(999999, "full"), "a card whose product never existed")
        cache.delete(card_key(5, "compact"))
        # KEY_PREFIX and VERSION come from the environment this site reads too.
        swept = subprocess.run(
            [binary, "sweep", "--cache-format", "django"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(swept.returncode, 0, swept.stderr)
        self.assertIn("1 orphans deleted", swept.stdout)
        self.assertEqual(cache.get(card_key(3, "full")), live(3, "full"))
        self.assertEqual(cache.get(card_key(5, "compact")), live(5, "compact"))
        self.assertIsNone(cache.get(card_key(999999, "full")))


class SafeByDefault(SimpleTestCase):
    """The example is what people copy: its defaults must be safe to deploy as they are."""

    def settings_as_loaded(self, **environment):
        """DEBUG and SECRET_KEY as a fresh process loads them (the test runner forces DEBUG off in
        this one), with DJANGO_* taken from `environment` alone."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
        env.update(environment)
        code = "import shopsite.settings as s; print(s.DEBUG); print(s.SECRET_KEY)"
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        debug, secret = out.stdout.split()
        return debug == "True", secret

    def test_debug_is_off_and_the_secret_is_random_unless_set(self):
        debug, first = self.settings_as_loaded()
        _, second = self.settings_as_loaded()
        self.assertFalse(debug)
        self.assertNotEqual(first, second)
        self.assertGreaterEqual(len(first), 50)
        debug, secret = self.settings_as_loaded(DJANGO_DEBUG="1", DJANGO_SECRET_KEY="given")
        self.assertEqual((debug, secret), (True, "given"))
