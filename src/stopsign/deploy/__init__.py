"""Layer 6, deploy: export to ONNX/TorchScript (export) and the HTTP service with its page (serve, static/)."""
