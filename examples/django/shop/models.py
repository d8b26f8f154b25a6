"""The shop's tables, as pgfresh's shop example creates them (`shop setup`). Unmanaged: the
schema belongs to the shop, and Django only reads and writes rows."""

from django.db import models
from django.db.models.functions import Now


class Product(models.Model):
    id = models.BigIntegerField(primary_key=True)
    name = models.TextField()
    description = models.TextField()
    price_cents = models.IntegerField()
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        managed = False
        db_table = "products"


class Review(models.Model):
    id = models.BigAutoField(primary_key=True)
    product = models.ForeignKey(
        Product, on_delete=models.CASCADE, related_name="reviews", db_column="product_id"
    )
    author = models.TextField()
    rating = models.SmallIntegerField()
    body = models.TextField()
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        managed = False
        db_table = "reviews"
