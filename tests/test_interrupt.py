"""No training lost to an interruption: Ctrl-C and SIGTERM stop at the end of a step and save, checkpoints resume
to the same digits, and no run silently replaces another's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import companion
from companion.callbacks import Callback
from companion.checkpoint import Checkpoint, ResumeError
from companion.data import DeviceLoader
from companion.models import FastCNN, load_weights
from companion.optim import EMA
from companion.recipes import common
from companion.recipes.cnn import CNN_RECIPE, make_cnn, train_cnn
from companion.recipes.vit import VIT_RECIPE, train_vit
from companion.train import TrainingInterrupted, fit

TINY = CNN_RECIPE.replace(widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, quick_batch_size=8)


class SignalAt(Callback):
    """Sends ``signum`` to this process after step ``step`` of epoch ``epoch`` (0-based), once; inert if None."""

    def __init__(self, epoch: int | None, step: int = 1, signum: int = signal.SIGINT) -> None:
        self.epoch, self.step, self.signum = epoch, step, signum

    def on_step_end(self, state) -> None:
        if state.epoch == self.epoch and state.step == self.step:
            self.epoch = None
            os.kill(os.getpid(), self.signum)


class StepCount(Callback):
    """Counts the training steps it sees."""

    def __init__(self) -> None:
        self.n = 0

    def on_step_end(self, state) -> None:
        self.n += 1


def loader(seed: int = 0) -> DeviceLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    return DeviceLoader(images, torch.arange(96) % 10, 16, shuffle=True, augment=True, device="cpu", seed=seed)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_fit_at_the_end_of_the_step_and_resume_gives_the_same_digits(tmp_path, signum) -> None:
    torch.set_num_threads(1)
    companion.seed_everything(0)
    model = FastCNN((8, 8, 8))
    ema = EMA(model, 0.9)
    full = fit(model, loader(), loader(), epochs=3, progress=False, callbacks=[ema, SignalAt(None)])
    want = weights(model)

    companion.seed_everything(0)
    model = FastCNN((8, 8, 8))
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(TrainingInterrupted) as stop:
        fit(
            model,
            loader(),
            loader(),
            epochs=3,
            progress=False,
            callbacks=[EMA(model, 0.9), Checkpoint(ckpt), SignalAt(1, 2, signum)],
        )
    assert stop.value.signal_name == signal.Signals(signum).name and (stop.value.epoch, stop.value.step) == (1, 2)
    assert stop.value.exit_code == 128 + signum and len(stop.value.history.test_acc) == 1  # one epoch done
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back

    companion.seed_everything(123)  # whatever the state now: the checkpoint brings back its own
    model = FastCNN((8, 8, 8))
    resumed = fit(
        model,
        loader(),
        loader(),
        epochs=3,
        progress=False,
        callbacks=[EMA(model, 0.9), Checkpoint(ckpt), SignalAt(None)],
        resume_from=ckpt,
    )
    assert resumed.test_acc == full.test_acc and resumed.train_loss == full.train_loss  # the same digits
    assert all(torch.equal(want[k], v) for k, v in weights(model).items())  # bit for bit


def test_resume_refuses_another_run(tmp_path) -> None:
    companion.seed_everything(0)
    model = FastCNN((8, 8, 8))
    ckpt = tmp_path / "run.ckpt"
    fit(model, loader(), epochs=1, progress=False, callbacks=[Checkpoint(ckpt)])
    with pytest.raises(ResumeError, match="other settings.*lr: 0.05 in the checkpoint, 0.1 now"):
        fit(
            FastCNN((8, 8, 8)),
            loader(),
            epochs=1,
            lr=0.1,
            progress=False,
            callbacks=[Checkpoint(ckpt)],
            resume_from=ckpt,
        )
    with pytest.raises(ResumeError, match="do not fit this model"):
        fit(FastCNN((8, 8, 16)), loader(), epochs=1, progress=False, callbacks=[Checkpoint(ckpt)], resume_from=ckpt)
    with pytest.raises(ResumeError, match="1 callbacks, this run has 0"):
        fit(FastCNN((8, 8, 8)), loader(), epochs=1, progress=False, resume_from=ckpt)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="junk.ckpt: not a readable checkpoint"):
        fit(FastCNN((8, 8, 8)), loader(), epochs=1, progress=False, resume_from=tmp_path / "junk.ckpt")
    with pytest.raises(ResumeError, match="no checkpoint at"):
        fit(FastCNN((8, 8, 8)), loader(), epochs=1, progress=False, resume_from=tmp_path / "none.ckpt")


@pytest.mark.parametrize("train", [train_cnn, train_vit])
def test_an_interrupted_recipe_run_keeps_its_weights_and_resumes_to_the_same_digits(
    train, fake_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Quick mode, the recipe's own path: SIGINT mid-epoch, then resume_from; the same accuracy digits."""
    torch.set_num_threads(1)
    recipe = (
        TINY
        if train is train_cnn
        else VIT_RECIPE.replace(dim=16, depth=1, num_heads=2, quick_n_train=40, quick_n_test=20, quick_batch_size=8)
    )
    killer, steps = SignalAt(None), StepCount()
    real_fit = common.fit
    monkeypatch.setattr(
        common, "fit", lambda *a, callbacks=(), **kw: real_fit(*a, callbacks=[*callbacks, killer, steps], **kw)
    )
    options = {"quick": True, "epochs": 3, "root": fake_cifar, "recipe": recipe, "progress": False}
    plain = train(**options, record=False)
    all_steps = steps.n

    killer.epoch, killer.step = 1, 2
    target = tmp_path / "w.safetensors"
    with pytest.raises(TrainingInterrupted):
        train(**options, save=target, checkpoint=tmp_path / "w.ckpt")
    err = capsys.readouterr().err
    partial = tmp_path / "w.partial.safetensors"
    assert f"Weights so far: {partial}" in err and "--resume" in err and (tmp_path / "w.ckpt").is_file()
    assert not target.exists() and not list(tmp_path.glob("w*.lock"))  # not a finished run; no lock left behind
    steps.n = 0
    resumed = train(**options, save=target, checkpoint=tmp_path / "w.ckpt", resume_from=tmp_path / "w.ckpt")
    assert 0 < steps.n < all_steps  # only the steps left after the interruption: the checkpoint was used
    assert (resumed.test_acc, resumed.test_acc_tta) == (plain.test_acc, plain.test_acc_tta)
    assert resumed.history.test_acc == plain.history.test_acc and target.is_file()


def test_save_never_replaces_a_file_unless_asked(fake_cifar: Path, tmp_path: Path) -> None:
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"somebody's weights")
    with pytest.raises(FileExistsError, match="exists: pass --overwrite"):
        train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=TINY, progress=False, save=target)
    assert target.read_bytes() == b"somebody's weights"
    result = train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=TINY, progress=False, save=target, overwrite=True)
    reloaded = load_weights(make_cnn(TINY.replace(whiten=False)), target)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded.eval()(x), result.model.cpu().eval()(x))


def test_a_second_run_to_the_same_path_fails_at_once(fake_cifar: Path, tmp_path: Path) -> None:
    target = tmp_path / "w.safetensors"
    (tmp_path / "w.safetensors.lock").write_text("12345\n")  # a run writing there now
    with pytest.raises(FileExistsError, match="another run is writing"):
        train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=TINY, progress=False, save=target)
    assert not target.exists()


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1", "COMPANION_QUICK": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "companion", "train", "cnn", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_command_line_saves_on_a_signal_and_resumes(fake_cifar: Path, tmp_path: Path, signum: int) -> None:
    """A subprocess sent SIGINT (Ctrl-C) or SIGTERM (a job scheduler) mid-training: weights and checkpoint saved.

    The name has a dot of its own (cnn.v1): the checkpoint is cnn.v1.ckpt, not cnn.ckpt.
    """
    out = tmp_path / "out"
    out.mkdir()
    args = ["--data", str(fake_cifar), "--epochs", "400", "--save", str(out / "cnn.v1.safetensors")]
    proc = _cli(*args, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (out / "cnn.v1.ckpt").exists():  # the first epoch's checkpoint: training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert "stopping at the end of this step" in stdout and f"--resume {out / 'cnn.v1.ckpt'}" in stderr
    assert (out / "cnn.v1.partial.safetensors").stat().st_size > 0 and not (out / "cnn.v1.safetensors").exists()
    assert "Traceback" not in stderr
    if signum == signal.SIGTERM:
        return
    resume = _cli(*args, "--resume", str(out / "cnn.v1.ckpt"), "--epochs", "400", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while resume.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        if (out / "cnn.v1.ckpt").stat().st_mtime > time.time() - 0.5:
            break
    resume.send_signal(signal.SIGINT)  # the resumed run is a run like any other: it stops and saves again
    _, stderr = resume.communicate(timeout=120)
    assert resume.returncode == 130 and "Traceback" not in stderr, stderr


def test_the_command_line_refuses_an_existing_file_in_one_line(fake_cifar: Path, tmp_path: Path) -> None:
    (tmp_path / "cnn.safetensors").write_bytes(b"keep me")
    proc = _cli("--quick", "--data", str(fake_cifar), "--save", str(tmp_path / "cnn.safetensors"), cwd=tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "exists: pass --overwrite" in stderr and "Traceback" not in stderr
    assert (tmp_path / "cnn.safetensors").read_bytes() == b"keep me"
    proc = _cli("--quick", "--seed", "-1", cwd=tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--seed" in stderr and "from 0 to" in stderr


def test_ctrl_c_while_the_finished_run_saves_waits_for_the_files(
    fake_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from companion.records import read_records

    real_save = common.save_weights

    def save_with_ctrl_c(model: torch.nn.Module, path: Path) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of writing the weights
        time.sleep(0.05)
        real_save(model, path)

    monkeypatch.setattr(common, "save_weights", save_with_ctrl_c)
    target = tmp_path / "w.safetensors"
    with pytest.raises(KeyboardInterrupt):  # it acts, once the files are written
        train_cnn(quick=True, epochs=1, root=fake_cifar, recipe=TINY, progress=False, save=target)
    load_weights(make_cnn(TINY.replace(whiten=False)), target)  # complete and readable
    assert len(read_records()) == 1  # and the record is there too


def test_the_command_line_says_bad_flags_and_missing_data_in_one_line(tmp_path: Path) -> None:
    env = os.environ | {"COMPANION_QUICK": "garbage"}
    proc = subprocess.run(
        [sys.executable, "-m", "companion", "train", "cnn"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "COMPANION_QUICK" in proc.stderr and "Traceback" not in proc.stderr
    env = os.environ | {"COMPANION_DOWNLOAD": "0", "COMPANION_QUICK": "1"}
    command = [sys.executable, "-m", "companion", "train", "cnn", "--data", str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "CIFAR-10 was not found" in proc.stderr and "Traceback" not in proc.stderr
