"""The ablation grid (titans.train.eval.ablate, scripts/ablate.py): every row is the config it says,
a tiny grid end to end and read back, a stopped run and a bad row in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.scripts import run_script
from titans.train.config import Diverged, TrainError, load_run_config
from titans.train.eval import ablate

QUIET = lambda line: None  # noqa: E731


def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")


def test_every_row_is_the_base_with_its_change():
    base = load_run_config("ablate", (), QUIET).model
    want = {"lmm-no-momentum": ("momentum", False), "lmm-no-decay": ("decay", False), "lmm-no-conv": ("conv_kernel", 1),
            "lmm-constant-gates": ("data_gates", False), "lmm-linear": ("depth", 1), "lmm-depth3": ("depth", 3),
            "lmm-residual-norm": ("residual_norm", True), "lmm-mean-loss": ("inner_loss", "mean")}
    for name, row in ablate.ROWS.items():
        model = load_run_config("ablate", row.overrides, QUIET).model
        if name in want:
            field, value = want[name]
            assert model.variant == "lmm" and getattr(model.memory, field) == value != getattr(base.memory, field)
            assert dataclasses.replace(model.memory, **{field: getattr(base.memory, field)}) == base.memory
        elif name == "mac-no-persistent":
            assert model.variant == "mac" and model.n_persistent == 0 < base.n_persistent
        else:
            assert model.variant == name and model.memory == base.memory


def test_tiny_grid_trains_reads_back_and_reports(tmp_path):
    overrides = ("train.steps=2", "train.eval_batches=1", "train.log_every=1", "train.eval_every=2")
    rows = ablate.check_rows(["mac-no-persistent", "lmm-no-decay"])
    results = ablate.run_grid("tiny", rows, (0,), tmp_path, overrides=overrides, log=QUIET)
    assert [(r["row"], r["seed"]) for r in results] == [("mac-no-persistent", 0), ("lmm-no-decay", 0)]
    assert all(r["valid_bpb"] > 0 and r["params"] > 0 for r in results)

    again = ablate.run_grid("tiny", rows, (0,), tmp_path, overrides=overrides, train_fn=no_training, log=QUIET)
    assert again == results
    table = ablate.markdown(results, rows)
    assert table.count("\n") == 4 and "| mac-no-persistent |" in table and "27.63 (w/o persistent memory)" in table


def test_a_diverged_run_is_a_result_of_its_row(tmp_path):
    def diverging(run, out, **kwargs):
        out.mkdir(parents=True)
        raise Diverged("loss is nan at step 22; stopped (train.on_divergence=stop). Last good checkpoint: none")

    rows = ablate.check_rows(["mag"])
    results = ablate.run_grid("tiny", rows, (0,), tmp_path, train_fn=diverging, log=QUIET)
    assert results == [{"row": "mag", "seed": 0, "params": results[0]["params"],
                        "diverged": "loss is nan at step 22"}]
    assert ablate.run_grid("tiny", rows, (0,), tmp_path, train_fn=no_training, log=QUIET) == results  # read back
    assert (f"| mag | {results[0]['params']:,} |  |  | diverged (loss is nan at step 22) |  | 25.70 |"
            in ablate.markdown(results, rows))


def test_a_stopped_run_and_a_bad_row_fail_in_one_line(tmp_path):
    def stopped(run, out, **kwargs):
        return {"status": "stopped by SIGTERM at step 1 (saved)"}

    with pytest.raises(TrainError, match="stopped by SIGTERM at step 1 .saved.; rerun the same command"):
        ablate.run_grid("tiny", ablate.check_rows(["swa"]), (0,), tmp_path, train_fn=stopped, log=QUIET)
    code, _, stderr = run_script("ablate", "--rows", "swa,nope", "--out", str(tmp_path))
    assert code == 1 and stderr.strip().splitlines()[0].startswith("ablate: unknown ablation row 'nope': choose from swa")
    assert not json.dumps(stderr).count("Traceback")
