"""Producers: the node agent, a module per proxy source, the push receiver, the publisher."""
