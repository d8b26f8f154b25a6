"""The product_card template tag: the card from the cache, and on a miss from pgfresh, which renders
it (and stores it) on demand. The site keeps no copy of the card's markup: pgfresh's fragment, in
Rust, is the one template. Gone with pgfresh: the cron job that rebuilt every card, `cache.set`, and
the site's own card template.

pgfresh must be the only writer of these keys (a live render stored by the site could overwrite a
newer one of pgfresh's), which asking pgfresh on a miss keeps true. When pgfresh cannot answer in
time (PGFRESH_SERVE_TIMEOUT, 200 ms unless set), the card's place is left empty for this request.
"""

from django import template
from django.conf import settings
from django.core.cache import cache
from django.utils.safestring import mark_safe

from ..pgfresh_client import pgfresh_get

register = template.Library()

VARIANTS = ("compact", "full")

# What a card's place shows when neither the cache nor pgfresh has it.
PLACEHOLDER = mark_safe("")


def card_key(product_id, variant):
    """The cache key of a card: the key pgfresh's product_card fragment writes."""
    if variant not in VARIANTS:
        raise ValueError("product_card variant must be one of {}".format(", ".join(VARIANTS)))
    return "shop:product_card:{}:{}".format(product_id, variant)


def from_pgfresh(key, fresh=False):
    """The card at `key` from pgfresh (rendered now on a miss), marked safe, or None."""
    html = pgfresh_get(
        key,
        url=settings.PGFRESH_SERVE_URL,
        token=settings.PGFRESH_SERVE_TOKEN,
        timeout=settings.PGFRESH_SERVE_TIMEOUT,
        fresh=fresh,
    )
    return None if html is None else mark_safe(html)


@register.simple_tag
def product_card(product, variant):
    key = card_key(product.pk, variant)
    rendered = cache.get(key)
    if rendered is None:
        rendered = from_pgfresh(key)
    return PLACEHOLDER if rendered is None else rendered
