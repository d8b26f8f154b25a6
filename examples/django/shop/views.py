"""The product list: the first products' compact cards, each read through the product_card tag."""

from django.shortcuts import render

from .models import Product


def product_list(request):
    products = Product.objects.order_by("pk")[:12]
    return render(request, "shop/product_list.html", {"products": products})
