"""A minimal Django site for pgfresh's shop: its product cards read from the cache pgfresh fills."""
