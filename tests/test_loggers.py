"""TensorBoard logging (train.log_to), read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_spec
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fusionkit.data.open import spec_store
from fusionkit.errors import FusionkitError, SpecError
from fusionkit.spec import load_spec
from fusionkit.training.loggers import RunLogger
from fusionkit.training.train import Trainer, make_split, train


def events(run):
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_gets_every_loss_term_metric_and_selection_diagnostic(synthetic_store, tmp_path):
    spec = tiny_spec(epochs=3, log_to=["tensorboard"])
    train(spec, synthetic_store, tmp_path / "run", fold=0, progress=False)
    acc = events(tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    tags = set(acc.Tags()["scalars"])
    expected = {"loss", "lr", "val/score", "val/acc_presence", "train/encoders_used",
                *(f"train/keep_rate/enc{k}" for k in range(3)), *(k for k in log[0] if k.startswith(("presence", "salience")))}
    assert expected <= tags
    assert steps(acc, "loss") == [0, 1, 2]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in log])
    assert [e.value for e in acc.Scalars("val/score")] == pytest.approx([r["val"]["score"] for r in log])
    assert log[0]["train"]["encoders_used"] == pytest.approx(2.0)  # top-2 of 3
    assert sum(log[0]["train"]["keep_rate"].values()) == pytest.approx(2.0)
    assert {"train/encoders_used", "train/keep_rate"} <= set(acc.Tags()["histograms"])


def test_a_resumed_run_drops_the_events_of_the_epochs_it_redoes(synthetic_store, tmp_path):
    spec = load_spec(tiny_spec(epochs=4, log_to=["tensorboard"]))
    store = spec_store(spec, synthetic_store)
    Trainer(spec, store, tmp_path / "run", make_split(store, 0), progress=False).fit(stop_after_epochs=2)
    train(tiny_spec(epochs=4, log_to=["tensorboard"]), synthetic_store, tmp_path / "run", fold=0, progress=False,
          resume=True)
    assert steps(events(tmp_path / "run"), "loss") == [0, 1, 2, 3]


@pytest.mark.parametrize("killed_at", [0, 2])
def test_a_kill_between_an_epochs_record_and_its_checkpoint_leaves_each_epoch_once(synthetic_store, tmp_path,
                                                                                  monkeypatch, killed_at):
    spec = load_spec(tiny_spec(epochs=4, log_to=["tensorboard"]))
    store = spec_store(spec, synthetic_store)
    save_last = Trainer._save_last

    def killed(self, setup, state, rng_states):
        if state.epoch == killed_at + 1:  # the record of epoch `killed_at` is logged; its last/ never written
            raise KeyboardInterrupt
        save_last(self, setup, state, rng_states)

    monkeypatch.setattr(Trainer, "_save_last", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(spec, store, tmp_path / "run", make_split(store, 0), progress=False).fit()
    assert steps(events(tmp_path / "run"), "loss") == list(range(killed_at + 1))
    monkeypatch.setattr(Trainer, "_save_last", save_last)
    train(tiny_spec(epochs=4, log_to=["tensorboard"]), synthetic_store, tmp_path / "run", fold=0, progress=False,
          resume=True)
    acc = events(tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps(acc, "loss") == [0, 1, 2, 3]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in log])


def test_a_tensorboard_folder_that_cannot_be_written_is_one_error(synthetic_store, tmp_path):
    spec = load_spec(tiny_spec(epochs=2, log_to=["tensorboard"]))
    store = spec_store(spec, synthetic_store)
    Trainer(spec, store, tmp_path / "run", make_split(store, 0), progress=False).fit(stop_after_epochs=1)
    shutil.rmtree(tmp_path / "run" / "tensorboard")
    (tmp_path / "run" / "tensorboard").write_text("in the way")  # as a read-only folder is to a user who is not root
    with pytest.raises(FusionkitError, match=r"run/tensorboard: TensorBoard cannot write its events there \(File exi"):
        train(tiny_spec(epochs=2, log_to=["tensorboard"]), synthetic_store, tmp_path / "run", fold=0, progress=False,
              resume=True)
    assert (tmp_path / "run" / "tensorboard").read_text() == "in the way"


def test_towers_log_recall_and_the_logit_scale(tmp_path):
    from test_distributed import pair_store_for, tower_ddp_spec

    spec = tower_ddp_spec(False)
    spec["train"]["log_to"] = ["tensorboard"]
    train(spec, pair_store_for(tmp_path), tmp_path / "run", fold=0, progress=False)
    tags = set(events(tmp_path / "run").Tags()["scalars"])
    assert {"val/r1", "val/r5", "train/logit_scale", "clip"} <= tags


def test_an_embedder_passes_its_own_logger_and_a_bad_name_is_refused(synthetic_store, tmp_path):
    seen = []

    class Collect(RunLogger):
        def log(self, epoch, record):
            seen.append((epoch, record["loss"]))

    spec = load_spec(tiny_spec(epochs=2))
    store = spec_store(spec, synthetic_store)
    Trainer(spec, store, tmp_path / "run", make_split(store, 0), progress=False, loggers=[Collect()]).fit()
    assert [e for e, _ in seen] == [0, 1]
    with pytest.raises(SpecError, match="train.log_to"):
        load_spec(tiny_spec(log_to=["wandb"]))
