"""Export: a trained model as split ONNX graphs and a manifest (:mod:`.graphs`), checked against PyTorch (:mod:`.check`).

The manifest format (:mod:`.manifest`) is torch-free, shared by the writer and the runtime; the package itself imports nothing."""
