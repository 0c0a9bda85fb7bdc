"""Layer 3, model: the backbone registry (backbones), what a backbone sees of an image (transforms), the cached backbone pass (features)."""
