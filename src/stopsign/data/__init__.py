"""Layer 2, data: image decoding (images), data set layouts and splits (datasets), data checks (checks), the demo generator (demo)."""
