"""Layer 2, data: image decoding (images), data set layouts and splits (datasets), data checks (checks), label edits
(labels, label_files); the demo's scene renderer (demo), imported only by `stopsign demo` and --synthetic-negatives."""
