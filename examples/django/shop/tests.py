"""What a Django site relies on when pgfresh fills its cache: `cache.get` and `cache.get_many`
return, through both common Redis backends, exactly what pgfresh's fragment renders; a miss is
rendered on demand by pgfresh (so the site keeps no card template), and a fresh read shows the
caller's own commit; a commit is what the next `cache.get` returns; deletes and pgfresh's sweep
behave in Django's format.

These tests need pgfresh's listener running on the same database and Redis, in Django's format with
this site's KEY_PREFIX and VERSION, serving misses at PGFRESH_SERVE_URL, and the shop set up with
hostile text in it: tests/django.rs arranges all of that (`cargo test --test django`).
PGFRESH_SHOP_BINARY names the shop binary, whose `render` command is the fragment's own render.
"""

import os
import socket
import subprocess
import sys
import time

from django.core.cache import caches
from django.template import Context, Template, TemplateDoesNotExist
from django.template.loader import get_template
from django.test import Client, SimpleTestCase, override_settings
from django.utils.safestring import SafeData

from .models import Product, Review
from .templatetags.shop_tags import VARIANTS, card_key, from_pgfresh, product_card

BACKENDS = ("default", "django_redis")

# How long pgfresh may take: generous, for a loaded 2-core machine (it takes milliseconds).
PATIENCE = 30.0


def eventually(what, condition):
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for {}".format(what))
        time.sleep(0.02)


def rendered(product_id, variant):
    """The fragment's own render of a card from the database as it is now: the shop binary's
    `render` command, which touches nothing."""
    out = subprocess.run(
        [os.environ["PGFRESH_SHOP_BINARY"], "render", "product_card", str(product_id),
         "--variant", variant, "--cache-format", "django"],
        capture_output=True, text=True, timeout=120,
    )
    if out.returncode != 0:
        raise AssertionError("render {} {}: {}".format(product_id, variant, out.stderr))
    return out.stdout[:-1]  # without the newline that ends its output


def forget(*product_ids):
    """Deletes these products' cards from the cache, every variant."""
    caches["default"].delete_many([card_key(i, v) for i in product_ids for v in VARIANTS])


class CacheGetReturnsWhatPgfreshWrote(SimpleTestCase):
    databases = {"default"}

    def test_every_hit_is_exactly_the_fragments_render(self):
        products = list(Product.objects.order_by("pk"))
        self.assertGreaterEqual(len(products), 50)
        hostile = [p for p in products if any(c in p.name for c in "<&\"'") or not p.name.isascii()]
        self.assertGreaterEqual(len(hostile), 2, "the harness put hostile names in")
        for product in products[:30] + hostile:
            for variant in VARIANTS:
                expected = rendered(product.pk, variant)
                for backend in BACKENDS:
                    hit = caches[backend].get(card_key(product.pk, variant))
                    self.assertEqual(hit, expected, (backend, product.pk, variant))
                    # Marked safe, as Django's own cache.set of a rendered template stores it: a
                    # tag returning it is not escaped again.
                    self.assertIsInstance(hit, SafeData)

    def test_with_the_cache_flushed_the_page_shows_every_card_rendered_by_pgfresh(self):
        with self.assertRaises(TemplateDoesNotExist, msg="the site keeps no card template"):
            get_template("templatetags/product_card.html")
        shown = list(Product.objects.order_by("pk")[:12])
        forget(*[p.pk for p in shown])
        page = Client().get("/")
        self.assertEqual(page.status_code, 200)
        html = page.content.decode("utf-8")
        for product in shown:
            card = rendered(product.pk, "compact")
            self.assertIn(card, html, product.pk)
            # Rendered by pgfresh, and stored by it: the next request is a hit.
            self.assertEqual(caches["default"].get(card_key(product.pk, "compact")), card)
        self.assertEqual(html.count('<article class="product-card compact"'), len(shown))

    def test_a_template_shows_the_fragment_on_a_hit_and_on_a_miss(self):
        tag = Template('{% load shop_tags %}{% product_card product "full" %}')
        for product in Product.objects.order_by("pk")[:5]:
            context = Context({"product": product})
            hit = tag.render(context)
            self.assertTrue(hit.startswith('<article class="product-card full"'), hit)
            forget(product.pk)
            self.assertEqual(tag.render(context), hit)

    def test_get_many_returns_every_card(self):
        ids = list(Product.objects.order_by("pk").values_list("pk", flat=True)[:20])
        keys = [card_key(i, v) for i in ids for v in VARIANTS]
        expected = {card_key(i, v): rendered(i, v) for i in ids for v in VARIANTS}
        for backend in BACKENDS:
            self.assertEqual(caches[backend].get_many(keys), expected, backend)

    def test_a_committed_change_is_what_the_next_get_returns(self):
        product = Product.objects.get(pk=7)
        product.price_cents += 1234
        product.name = "Renamed: l'été & <co>"
        product.save(update_fields=["price_cents", "name"])
        Review.objects.create(product=product, author="Zoë", rating=4, body='"Fresh" ✓')
        for variant in VARIANTS:
            expected = rendered(7, variant)
            self.assertIn("Renamed: l'été &amp; &lt;co&gt;", expected)
            for backend in BACKENDS:
                key = card_key(7, variant)
                eventually(
                    "{} in {} to show the change".format(key, backend),
                    lambda: caches[backend].get(key) == expected,
                )

    def test_a_fresh_read_shows_the_callers_own_commit_at_once(self):
        Product.objects.filter(pk=13).update(price_cents=987654)
        card = from_pgfresh(card_key(13, "full"), fresh=True)
        self.assertIn("$9876.54", card)
        self.assertEqual(card, rendered(13, "full"))
        self.assertEqual(caches["default"].get(card_key(13, "full")), card)

    def test_a_deleted_product_leaves_the_cache(self):
        Product.objects.get(pk=9).delete()
        for variant in VARIANTS:
            for backend in BACKENDS:
                key = card_key(9, variant)
                eventually(
                    "{} to leave {}".format(key, backend),
                    lambda: caches[backend].get(key) is None,
                )

    def test_when_pgfresh_cannot_answer_a_miss_is_an_empty_placeholder(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        forget(11)
        product = Product.objects.get(pk=11)
        with override_settings(PGFRESH_SERVE_URL="http://127.0.0.1:{}".format(closed)):
            with self.assertLogs("shop.pgfresh_client", "WARNING"):
                self.assertEqual(product_card(product, "compact"), "")
        self.assertIsNone(caches["default"].get(card_key(11, "compact")), "the tag stores nothing")
        # Any change to the product brings the card back, written by pgfresh.
        Product.objects.filter(pk=11).update(price_cents=product.price_cents + 1)
        eventually(
            "the card to be back",
            lambda: caches["default"].get(card_key(11, "compact")) == rendered(11, "compact"),
        )

    def test_the_sweep_repairs_and_deletes_in_djangos_format(self):
        binary = os.environ["PGFRESH_SHOP_BINARY"]
        cache = caches["default"]
        cache.set(card_key(3, "full"), "written by someone else")
        cache.set("shop:product_card:999999:full", "a card whose product never existed")
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
        self.assertEqual(cache.get(card_key(3, "full")), rendered(3, "full"))
        self.assertEqual(cache.get(card_key(5, "compact")), rendered(5, "compact"))
        self.assertIsNone(cache.get("shop:product_card:999999:full"))


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
