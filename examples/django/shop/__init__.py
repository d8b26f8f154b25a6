"""The shop app: the shop's tables as unmanaged models, and the product_card template tag."""
