"""Layer 7, deploy: export to ONNX/TorchScript (export) and the HTTP service with its page (serve, static/)."""
