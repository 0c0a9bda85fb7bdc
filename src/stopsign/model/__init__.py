"""Layer 3, model: the backbone registry and weights (backbones), every pooling and the head's forward
(pooling), the extraction pass's rewritten copy of a backbone (rewrites), what a backbone sees of an image
(transforms), the cached backbone pass (features)."""
