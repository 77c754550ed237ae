"""A Flower benchmark app: fixed synthetic updates, or a small MLP trained on generated data."""
