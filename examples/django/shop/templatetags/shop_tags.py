"""The product_card template tag, as a site that caches its fragments writes it, minus two things
pgfresh makes unnecessary: the cron job that rebuilt every card, and `cache.set` on a miss.

pgfresh must be the only writer of these keys. A live render stored by the site could overwrite a
newer render from pgfresh (the site read the database before a commit, pgfresh wrote after it, the
site stores last), and that stale card would stay until the product changes again. So a miss renders
live for this request only; pgfresh fills the key within milliseconds of any change.
"""

from django import template
from django.core.cache import cache
from django.db.models import Avg, Count, DecimalField
from django.db.models.functions import Round
from django.template.loader import render_to_string
from django.utils.safestring import mark_safe

register = template.Library()

VARIANTS = ("compact", "full")


def card_key(product_id, variant):
    """The cache key of a card: the key pgfresh's product_card fragment writes."""
    return "shop:product_card:{}:{}".format(product_id, variant)


@register.simple_tag
def product_card(product, variant, use_cache=True):
    key = card_key(product.pk, variant)
    if use_cache:
        rendered = cache.get(key)
        if rendered is not None:
            return rendered
    return render_to_string("templatetags/product_card.html", card_context(product, variant))


def card_context(product, variant):
    """What the card shows, as pgfresh's fragment loads it: the review count, the average rating
    rounded by PostgreSQL to one decimal, and the latest three reviews, newest first."""
    if variant not in VARIANTS:
        raise ValueError("product_card variant must be one of {}".format(", ".join(VARIANTS)))
    reviews = product.reviews.all()
    stats = reviews.aggregate(
        count=Count("id"),
        average=Round(Avg("rating", output_field=DecimalField()), 1),
    )
    full = variant == "full"
    return {
        "product": product,
        "variant": variant,
        "full": full,
        "price": price(product.price_cents),
        "review_count": stats["count"],
        "average": None if stats["average"] is None else str(stats["average"]),
        "latest": list(reviews.order_by("-created_at", "-id")[:3]) if full else [],
    }


def price(cents):
    """`$12.05` from 1205 cents (`$-0.50` for a negative price), as the fragment formats it."""
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return "${}{}.{:02d}".format(sign, cents // 100, cents % 100)


@register.filter(is_safe=True)
def html_text(value):
    """Escapes text exactly as pgfresh's renderer (maud) does: `&`, `<`, `>` and `"`, so that a miss
    shows the very bytes a hit shows (which the example's tests check; a site needs that only for
    such a test). Django's own escaping also turns `'` into `&#x27;`. Safe in text and in
    double-quoted attributes, as maud's is; not in single-quoted ones."""
    text = str(value)
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;")):
        text = text.replace(raw, escaped)
    return mark_safe(text)
