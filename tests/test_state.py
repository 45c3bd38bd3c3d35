"""The training loop's state (fusionkit.training.state) and where a run's data comes from (fusionkit.data.open)."""

from __future__ import annotations

import pytest

from fusionkit.data.open import DataSource
from fusionkit.errors import CheckpointError
from fusionkit.training.state import LoopState


def test_the_loop_state_round_trips_through_its_state_dict():
    state = LoopState(epoch=3, step=42, best_score=0.61, best_epoch=2, since_best=1)
    saved = state.state_dict()
    assert saved == {"epoch": 3, "step": 42, "best_score": 0.61, "best_epoch": 2, "since_best": 1}
    fresh = LoopState()
    fresh.load_state_dict(saved)
    assert fresh == state and LoopState.from_state_dict(saved) == state
    assert LoopState().best_score < 0 and LoopState().best_epoch == -1  # the first validation is always a best


@pytest.mark.parametrize("saved", [{"epoch": 1}, {**LoopState().state_dict(), "lr": 0.1}, [1, 2]])
def test_a_trainer_state_that_this_trainer_did_not_write_is_a_checkpoint_error(saved):
    with pytest.raises(CheckpointError, match=r"run/last: the trainer state holds .*expected \['best_epoch'"):
        LoopState.from_state_dict(saved, where="run/last")


def test_a_data_source_takes_paths_and_is_passed_on_whole(tmp_path):
    source = DataSource(tmp_path / "store", raw=tmp_path / "m.csv")
    assert (source.data, source.raw, source.confine, source.target) == (str(tmp_path / "store"), str(tmp_path / "m.csv"),
                                                                        None, None)
    assert DataSource.of(source) is source
    assert DataSource.of(tmp_path / "store", target=tmp_path / "t") == DataSource(tmp_path / "store", target=tmp_path / "t")
    with pytest.raises(TypeError, match="raw, target: give them in the DataSource"):
        DataSource.of(source, raw="m.csv", target="t")
