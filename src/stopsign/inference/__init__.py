"""Layer 6, inference: the torch-free base (base), the exported format (exported), the backends (pytorch, torchscript, onnx), load_classifier (load), evaluate()."""
