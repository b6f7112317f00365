"""The join of predictions and labels: the Redis store (``store``) and the joiner role (``joiner``)."""
