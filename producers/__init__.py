"""Producers: the node agent, one module per proxy source, the panel push receiver, the publisher."""
