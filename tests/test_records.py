"""Result records: written where COMPANION_RECORDS says, read back equal, bad input refused with a clear error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from companion.recipes.cnn import CNN_RECIPE, train_cnn
from companion.records import read_records, record_fit, record_name, records_dir, write_record
from companion.train import History


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "records"
    monkeypatch.setenv("COMPANION_RECORDS", str(folder))
    return folder


def test_round_trip_sorted_by_name(records: Path) -> None:
    first = {"model": "ViT", "test_acc": 0.6019, "mode": "full", "hardware": {"device": "cpu", "threads": 2}}
    second = {"model": "FastCNN", "test_acc": 0.9, "mode": "quick"}
    assert records_dir() == records
    assert not read_records()  # nothing yet: an empty list, not an error
    write_record(first, "ch05_vit")
    write_record(second, "ch03_fastcnn")
    back = read_records()
    assert [r["name"] for r in back] == ["ch03_fastcnn", "ch05_vit"]
    for written, read in zip([second, first], back):
        assert {k: read[k] for k in written} == written
        assert "written" in read  # when, in UTC
    assert sorted(p.name for p in records.iterdir()) == ["ch03_fastcnn.json", "ch05_vit.json"]  # no temp files left


def test_rewrite_replaces(records: Path) -> None:
    write_record({"test_acc": 0.5}, "run")
    write_record({"test_acc": 0.7}, "run")
    (only,) = read_records()
    assert only["test_acc"] == 0.7


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "with space", ".hidden"])
def test_bad_name_refused(records: Path, name: str) -> None:
    with pytest.raises(ValueError, match="record name"):
        write_record({"x": 1}, name)


def test_nan_refused_before_writing(records: Path) -> None:
    with pytest.raises(ValueError):
        write_record({"test_acc": math.nan}, "broken")
    assert not records.exists() or not list(records.iterdir())


def test_a_bad_record_is_skipped_with_a_warning_naming_it(records: Path) -> None:
    write_record({"test_acc": 0.5}, "good")
    (records / "bad.json").write_text("{not json")
    with pytest.warns(UserWarning, match="bad.json.*not readable JSON"):
        assert [r["name"] for r in read_records()] == ["good"]  # the other rows still show
    for empty in ({"name": "bad"}, [], {"test_acc": None}, {"test_acc": "0.9"}):
        (records / "bad.json").write_text(json.dumps(empty))
        with pytest.warns(UserWarning, match="bad.json.*no test accuracy"):
            assert [r["name"] for r in read_records()] == ["good"]
    (records / "bad.json").write_text('{"test_acc": NaN}')  # Python's json reads NaN; the page must not show it
    with pytest.warns(UserWarning, match="bad.json"):
        assert [r["name"] for r in read_records()] == ["good"]


def test_a_value_json_cannot_hold_is_a_clear_error(records: Path) -> None:
    with pytest.raises(ValueError, match="holds a value JSON cannot store"):
        write_record({"test_acc": 0.5, "lr": object()}, "odd")


def test_record_name_same_for_a_rerun_different_for_another_configuration(records: Path) -> None:
    run = {
        "model": "FastCNN(32, 64, 128) + cosine head over 10 class-text embeddings (temperature 0.1453)",
        "mode": "full",
        "settings": {"lr": 0.1, "patch_size": 4},
        "epochs": 5,
        "n_train": 50_000,
    }
    rerun = run | {"model": run["model"].replace("0.1453", "0.1512"), "test_acc": 0.8}
    name = record_name(run)
    assert name == record_name(rerun)  # a learned value in the title does not make a new record
    assert name.startswith("fastcnn-32-64-128-cosine-head-over-10-class-text-embeddings-full-")
    others = [
        run | {"mode": "quick"},
        run | {"settings": {"lr": 0.1, "patch_size": 2}},
        run | {"epochs": 7},
        run | {"model": "FastCNN(32, 64, 128) + cosine head over 8 class-text embeddings"},
    ]
    names = {record_name(r) for r in others}
    assert len(names) == len(others) and name not in names
    assert write_record(run, name) == records / f"{name}.json"  # a valid file name


TINY = CNN_RECIPE.replace(widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, quick_batch_size=16)


def test_a_run_writes_its_record_and_each_seed_has_its_own(records: Path, fake_cifar: Path, capsys) -> None:
    train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=TINY, progress=False, record=False)
    assert not read_records()  # asked not to record
    capsys.readouterr()
    result = train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=TINY, progress=False, verbose=False)
    assert capsys.readouterr().out == ""  # quiet, and still recorded: printing and recording are two choices
    (record,) = read_records()
    assert record["name"] == record_name(result.record()) and record["seed"] == 0
    assert {k: record[k] for k in result.record()} == json.loads(json.dumps(result.record()))
    train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=TINY, progress=False)
    assert len(read_records()) == 1  # the same configuration and seed again: replaced, not added
    train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=TINY, progress=False, seed=1)
    assert sorted(r["seed"] for r in read_records()) == [0, 1]  # another seed is another run: both rows stay


def test_a_failing_record_never_costs_the_weights(
    records: Path, fake_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from companion.recipes import common

    def unwritable(record: dict, name: str) -> Path:
        raise ValueError("record 'x' holds a value JSON cannot store")

    monkeypatch.setattr(common, "write_record", unwritable)
    target = tmp_path / "w.safetensors"
    with pytest.warns(UserWarning, match="could not write the result record"):
        train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=TINY, progress=False, save=target)
    assert target.stat().st_size > 0  # the weights were written first


def test_an_unwritable_records_folder_keeps_the_run(
    tmp_path: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("COMPANION_RECORDS", str(blocker / "records"))  # cannot be created: a file is in the way
    with pytest.warns(UserWarning, match="could not write the result record"):
        result = train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=TINY, progress=False)
    assert 0 <= result.test_acc <= 1 and result.model is not None


def test_record_fit_writes_a_results_page_row(records: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPANION_QUICK", "1")
    history = History(test_acc=[0.31, 0.42], seconds=[1.5, 2.0], device="cpu")
    path = record_fit("TinyCNN (Chapter 1)", history, n_train=2_000, settings={"lr": 0.05, "batch_size": 128})
    (back,) = read_records()
    assert path.name == back["name"] + ".json"
    assert (back["model"], back["mode"], back["test_acc"], back["epochs"]) == ("TinyCNN (Chapter 1)", "quick", 0.42, 2)
    assert back["train_seconds"] == 3.5 and back["n_train"] == 2_000 and back["test_acc_tta"] is None
    record_fit("TinyCNN (Chapter 1)", history, n_train=2_000, settings={"lr": 0.05, "batch_size": 128}, test_acc=0.5)
    assert [r["test_acc"] for r in read_records()] == [0.5]  # a rerun replaces its row
    monkeypatch.setenv("COMPANION_QUICK", "0")
    record_fit("TinyCNN (Chapter 1)", history, n_train=50_000, settings={"lr": 0.05, "batch_size": 128})
    assert sorted(r["mode"] for r in read_records()) == ["full", "quick"]  # the two modes are two rows


def test_record_fit_without_test_accuracy_says_what_to_pass(records: Path) -> None:
    with pytest.raises(ValueError, match="test_acc="):
        record_fit("AttentionCNN", History(seconds=[1.0], device="cpu"), n_train=10, settings={})
    assert not records.exists() or not list(records.iterdir())
