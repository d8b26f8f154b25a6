"""The site's one page: the product list, its cards read from the cache."""

from django.urls import path

from shop import views

urlpatterns = [path("", views.product_list, name="product_list")]
