"""Run an exported model (``fusionkit export RUN --out DIR``) with numpy and onnxruntime, without torch.

    import fusionkit.runtime
    model = fusionkit.runtime.load("exported")
    out = model.predict({"audio": audio, "video": video}, budget="40%")
    out = model.predict({"audio": audio, "face": ["a.png", "b.png"]})  # a live image encoder: paths, read on demand
    out.probs, out.ran, out.cost, out.answers

Conditional execution is kept: each on-demand encoder's graph runs only on the rows that keep it. The command line
is ``fusionkit-runtime DIR --data STORE --out sub.json`` (or ``python -m fusionkit.runtime``). Nothing here imports
torch or a fusionkit module that does (docs/deployment.md).
"""

from fusionkit.runtime.images import read_images
from fusionkit.runtime.model import DeploymentError, RuntimeModel, RuntimeOutput, load
from fusionkit.runtime.store import StoreRows, read_inputs, read_store

__all__ = ["load", "RuntimeModel", "RuntimeOutput", "DeploymentError", "read_store", "read_inputs", "read_images",
           "StoreRows"]
