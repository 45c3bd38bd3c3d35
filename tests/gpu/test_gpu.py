"""On a machine with a GPU (``make test-gpu``; ``make test`` leaves this folder out): a GPU run reproduces the
CPU run's metrics within a tolerance, in float32 and bf16, under torchrun on one GPU too, and its checkpoint
loads on the CPU. Without a GPU these tests fail: run them where one is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_spec

from fusionkit.models.factory import load_model
from fusionkit.training.train import train

#: Scores over ~80 test samples: one sample is 0.0125; kernels differ between CPU and GPU.
TOLERANCE = 0.03


def test_this_machine_has_a_gpu():
    assert torch.cuda.is_available(), "tests/gpu needs a CUDA device; `make test` runs the CPU suite"


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_a_gpu_run_reproduces_the_cpu_run(precision, synthetic_store, tmp_path):
    spec = tiny_spec(epochs=4, precision=precision)
    cpu = train(spec, synthetic_store, tmp_path / "cpu", fold=0, progress=False, device="cpu")
    gpu = train(spec, synthetic_store, tmp_path / "gpu", fold=0, progress=False, device="cuda")
    assert json.loads((tmp_path / "gpu" / "run.json").read_text())["device"] == "cuda:0"
    assert abs(gpu["test"]["score"] - cpu["test"]["score"]) <= TOLERANCE
    model = load_model(tmp_path / "gpu" / "best", device="cpu")  # saved on the GPU, loaded on the CPU
    assert next(model.parameters()).device.type == "cpu"


def test_torchrun_on_one_gpu(synthetic_store, tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec(epochs=3)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "fusionkit", "train", str(tmp_path / "spec.yaml"), "--data", str(synthetic_store),
                           "--out", str(tmp_path / "run"), "--fold", "0", "--quiet", "--device", "cuda"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["device"] == "cuda:0"
