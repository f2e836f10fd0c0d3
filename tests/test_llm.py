"""Chapter 6: the frozen text encoder (offline load, cache, clear errors), prompt ensembling, the cosine-logit
head, and the caption decoder (shapes, causality, greedy decoding, learning a toy captioning task)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from companion import llm
from companion.data import CIFAR10_CLASSES
from companion.llm import TEMPLATES, TextEncoder, class_embeddings, ensemble, text_to_label
from companion.models import AttentionCNN, CaptionDecoder, CNNEncoder, CosineClassifier, FastCNN, ImageTextClassifier
from companion.recipes import caption
from companion.recipes.caption import train_captioner
from companion.recipes.common import cifar10_loaders
from companion.recipes.llm import LLM_RECIPE, train_linear_baseline, train_llm
from companion.vocab import WordVocab

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # the default model must load with downloads switched off
        return TextEncoder()


def test_text_encoder_offline_load_and_unit_norm(encoder: TextEncoder) -> None:
    emb = encoder.encode(["a photo of a cat.", "a photo of a truck.", "a picture of a kitten.", ""])
    assert emb.shape == (4, 384) and emb.dtype == torch.float32 and encoder.dim == 384
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    # a pretrained model, not a random one: a kitten is nearer a cat than a truck is
    assert emb[0] @ emb[2] > emb[1] @ emb[2] + 0.2


def test_text_encoder_caches_each_string(encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    first = encoder.encode(["a photo of a dog.", "a photo of a dog."])
    torch.testing.assert_close(first[0], first[1])

    def fail(*args, **kwargs):
        raise AssertionError("a cached string was encoded again")

    monkeypatch.setattr(encoder.model, "encode", fail)
    torch.testing.assert_close(encoder.encode(["a photo of a dog."]), first[:1])
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_text_encoder_rejects_a_bare_string(encoder: TextEncoder) -> None:
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode("a photo of a cat.")


def test_text_encoder_takes_any_iterable_of_strings(encoder: TextEncoder) -> None:
    import numpy as np

    texts = ["a photo of a cat.", "a photo of a ship."]
    want = encoder.encode(texts)
    torch.testing.assert_close(encoder.encode(t for t in texts), want)  # a generator, read once
    torch.testing.assert_close(encoder.encode(np.array(texts)), want)  # numpy.str_ items
    torch.testing.assert_close(encoder.encode(tuple(texts)), want)
    assert all(type(k) is str for k in encoder._cache)
    for bad, match in ((np.array([texts]), "item of type ndarray"), ([1, 2], "item of type int"), (3, "got int")):
        with pytest.raises(ValueError, match=match):
            encoder.encode(bad)


def test_text_longer_than_the_model_limit_warns_once(encoder: TextEncoder) -> None:
    limit = encoder.model.max_seq_length
    long = ["a photo of a cat " * limit, "a photo of a dog " * limit]
    with pytest.warns(
        UserWarning, match=rf"2 of 3 texts are longer than the text model's limit of {limit} tokens"
    ) as rec:
        encoder.encode([*long, "a photo of a frog."])
    assert len([w for w in rec if "truncated" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # short texts, and texts already cached, give no warning
        encoder.encode(["a photo of a bird.", *long])


@pytest.mark.parametrize("name", ["no such model!", "a/b/c", "-bad-"])
def test_unknown_model_name_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="unknown text model name"):
        TextEncoder(name)


def test_unknown_model_name_online_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(name: str, timeout: float) -> None:
        raise RepositoryNotFoundError("404", response=types.SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(llm, "_hub_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.model_info", not_found)
    with pytest.raises(ValueError, match="unknown text model name 'nobody/no-such-model'.*no such model"):
        TextEncoder("nobody/no-such-model")


def test_model_that_needs_a_download_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="needs a download.*HF_HUB_OFFLINE"):
        TextEncoder("sentence-transformers/all-mpnet-base-v2")


def test_model_that_needs_a_download_without_network_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(name: str, timeout: float) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(llm, "_hub_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.model_info", no_network)
    with pytest.raises(ValueError, match="needs a download.*cannot be reached"):
        TextEncoder("sentence-transformers/all-mpnet-base-v2")


@pytest.mark.parametrize("seed", range(5))
def test_ensemble_is_the_renormalised_mean_of_unit_vectors(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c, t, d = (int(v) for v in torch.randint(1, 12, (3,), generator=g))
    emb = torch.randn(c, t, d, generator=g) * torch.rand(c, t, 1, generator=g) * 5  # arbitrary norms
    out = ensemble(emb)
    for i in range(c):
        mean = sum(emb[i, j] / emb[i, j].norm() for j in range(t)) / t
        torch.testing.assert_close(out[i], mean / mean.norm())
    torch.testing.assert_close(out.norm(dim=1), torch.ones(c))
    with pytest.raises(ValueError, match="classes, templates, D"):
        ensemble(emb[0])


def test_class_embeddings_ensemble_the_prompts(encoder: TextEncoder) -> None:
    classes, templates = ["cat", "truck"], TEMPLATES[:3]
    out = class_embeddings(encoder, classes, templates)
    by_hand = torch.stack(
        [F.normalize(encoder.encode([t.format(c) for t in templates]).mean(0), dim=0) for c in classes]
    )
    torch.testing.assert_close(out, by_hand)
    single = class_embeddings(encoder, classes, ["a photo of a {}."])
    torch.testing.assert_close(single, encoder.encode(["a photo of a cat.", "a photo of a truck."]))
    with pytest.raises(ValueError, match="exactly one '{}'"):
        class_embeddings(encoder, classes, ["a photo"])


def test_text_to_label_maps_captions_to_the_nearest_class(encoder: TextEncoder) -> None:
    class_emb = class_embeddings(encoder, CIFAR10_CLASSES)
    captions = ["a blurry photo of a cat.", "a photo of the big truck.", "a good photo of a ship.", "a frog"]
    assert text_to_label(encoder, captions, class_emb).tolist() == [3, 9, 8, 6]


@pytest.mark.parametrize("seed", range(6))
def test_cosine_head_is_scaled_cosine_similarity(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b, f, c, d = (int(v) for v in torch.randint(1, 20, (4,), generator=g))
    text = torch.randn(c, d, generator=g)
    head = CosineClassifier(f, text, init_temperature=0.05 + 0.1 * torch.rand(1, generator=g).item())
    x = torch.randn(b, f, generator=g)
    z = head.proj(x)
    by_hand = torch.stack(
        [torch.stack([F.cosine_similarity(z[i], text[j], dim=0) for j in range(c)]) for i in range(b)]
    )
    torch.testing.assert_close(head(x), head.logit_scale.exp() * by_hand, rtol=1e-5, atol=1e-5)
    assert head(x).abs().max() <= head.logit_scale.exp() + 1e-4
    assert "text" not in dict(head.named_parameters())  # the text embeddings are locked
    head(x).logsumexp(1).sum().backward()
    assert head.logit_scale.grad is not None and head.proj.weight.grad is not None


def test_cosine_head_clamps_the_scale_and_swaps_classes() -> None:
    head = CosineClassifier(8, torch.randn(10, 16), init_temperature=1e-4)  # scale 10,000 -> clamped at 100
    x = torch.randn(3, 8)
    assert head(x).abs().max() <= 100 + 1e-3
    head.set_classes(torch.randn(2, 16))
    assert head(x).shape == (3, 2)
    with pytest.raises(ValueError, match=r"\(classes, 16\)"):
        head.set_classes(torch.randn(2, 15))
    with pytest.raises(ValueError, match="classes, D"):
        CosineClassifier(8, torch.randn(16))


def test_cnn_encoder_is_the_fastcnn_body() -> None:
    torch.manual_seed(0)
    cnn = FastCNN((8, 16, 32)).eval()
    x = torch.randn(4, 3, 32, 32)
    head, logits = cnn.head, cnn(x)
    body = {k for k in cnn.state_dict() if not k.startswith("head.")}
    enc = CNNEncoder(cnn)
    torch.testing.assert_close(head(enc(x)) * cnn.logit_scale, logits)
    assert enc.forward_features(x).shape == (4, 32, 3, 3)
    torch.testing.assert_close(enc.forward_features(x), cnn.forward_features(x))
    assert set(enc.state_dict()) == {f"cnn.{k}" for k in body}  # the CNN's body, its head gone
    model = ImageTextClassifier(FastCNN((8, 16, 32)), torch.randn(10, 24))
    assert model(x).shape == (4, 10)
    torch.testing.assert_close(model.embed(x).norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.randn(3, 32, 32))


def test_cnn_encoder_keeps_an_attention_cnns_block() -> None:
    torch.manual_seed(0)
    cnn = AttentionCNN((8, 16, 32), attention_after=2).eval()
    with torch.no_grad():
        cnn.attention.gamma.fill_(1.0)  # the block now changes the features (gamma starts at 0)
    x = torch.randn(2, 3, 32, 32)
    want = cnn.forward_features(x)
    assert not torch.allclose(FastCNN.forward_features(cnn, x), want)  # without the block: other features
    torch.testing.assert_close(CNNEncoder(cnn).forward_features(x), want)  # the block is used, not skipped


def test_vocab_round_trip_and_errors() -> None:
    vocab = WordVocab([t.format(c) for c in CIFAR10_CLASSES for t in TEMPLATES])
    texts = ["a photo of a cat.", "a black and white photo of the big truck."]
    ids = vocab.encode(texts)
    assert ids.shape == (2, 12) and ids[0, 0] == vocab.BOS and ids[0, 7] == vocab.EOS and ids[0, 8:].eq(vocab.PAD).all()
    assert vocab.decode(ids) == texts
    with pytest.raises(ValueError, match=r"\['kitten'\].*not in the vocabulary"):
        vocab.encode(["a photo of a kitten."])
    with pytest.raises(ValueError, match="max_len"):
        vocab.encode(texts, max_len=5)


@pytest.mark.parametrize("seed", range(3))
def test_caption_decoder_shapes_and_causality(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    b, t, v = (int(x) for x in torch.randint(1, 10, (3,), generator=g))
    v += 3
    c, h, w = int(torch.randint(1, 40, (1,), generator=g)), *(int(x) for x in torch.randint(1, 5, (2,), generator=g))
    dec = CaptionDecoder(
        v, c, dim=16, depth=2, num_heads=int(torch.randint(1, 3, (1,), generator=g)) * 2, max_len=12
    ).eval()
    fmap = torch.randn(b, c, h, w, generator=g)
    tokens = torch.randint(0, v, (b, t), generator=g)
    logits = dec(fmap, tokens)
    assert logits.shape == (b, t, v)
    later = tokens.clone()
    later[:, -1] = (later[:, -1] + 1) % v  # changing the last word must not change earlier predictions
    torch.testing.assert_close(dec(fmap, later)[:, :-1], logits[:, :-1])
    other = dec(fmap.roll(1, dims=0), tokens) if b > 1 else dec(fmap + 1, tokens)
    assert not torch.allclose(other, logits)  # the words do look at the image
    out = dec.generate(fmap, max_len=9)
    assert out.shape[0] == b and 2 <= out.shape[1] <= 9 and out[:, 0].eq(WordVocab.BOS).all()
    for row in out.tolist():  # after the first <eos> nothing but <eos>
        if WordVocab.EOS in row:
            assert set(row[row.index(WordVocab.EOS) :]) == {WordVocab.EOS}
    with pytest.raises(ValueError, match="max_len=12"):
        dec(fmap, torch.zeros(b, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        dec(fmap[0], tokens)


def test_caption_decoder_learns_to_name_the_class(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    classes = ["cat", "dog", "ship"]
    templates = ["a photo of a {}.", "a blurry photo of the {}."]
    vocab = WordVocab([t.format(c) for c in classes for t in templates])
    captions = torch.stack([vocab.encode([t.format(c) for t in templates], max_len=9) for c in classes])  # (3, 2, 8)
    labels = torch.arange(3).repeat(100)
    prototypes = torch.randn(3, 16, 2, 2)
    fmaps = prototypes[labels] + 0.3 * torch.randn(300, 16, 2, 2)
    dec = CaptionDecoder(len(vocab), 16, dim=32, depth=1, num_heads=2, max_len=9)
    calls = []
    real_fit = caption.fit
    monkeypatch.setattr(caption, "fit", lambda *a, **kw: calls.append(kw["config"]) or real_fit(*a, **kw))
    losses = train_captioner(dec, fmaps, labels, captions, epochs=8, batch_size=32, lr=3e-3, progress=False)
    assert len(calls) == 1 and calls[0].ignore_index == WordVocab.PAD  # the one training loop, padding unscored
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    words = [text.split()[-1].rstrip(".") for text in vocab.decode(dec.generate(prototypes))]
    assert words == classes


def test_recipe_trains_on_the_chosen_classes_only(fake_cifar, encoder: TextEncoder, capsys) -> None:
    tmp_path = fake_cifar
    recipe = LLM_RECIPE.replace(widths=(8, 8, 8), quick_n_train=40, quick_n_test=20, batch_size=4)
    train, test = cifar10_loaders(recipe.for_mode(True).replace(classes=("cat", "truck")), root=tmp_path)
    assert set(train.labels.tolist()) == {0, 1} and len(test.labels) == 4  # 2 of each class among the 20
    three = recipe.replace(classes=("dog", "ship", "frog"))
    result = train_llm(quick=True, epochs=1, root=tmp_path, recipe=three, encoder=encoder, progress=False)
    assert "test accuracy" in capsys.readouterr().out
    assert sorted(result.train_labels.unique().tolist()) == [0, 1, 2] and result.recipe.classes == three.classes
    assert result.model.head.text.shape == (3, 384) and 0 < result.notes["temperature"] < 1
    baseline = train_linear_baseline(quick=True, epochs=1, root=tmp_path, recipe=recipe, progress=False, verbose=False)
    assert baseline.model.head.out_features == 10 and baseline.params < result.params
    with pytest.raises(ValueError, match="distinct CIFAR-10 class names"):
        recipe.replace(classes=("cat", "kitten"))


def test_bench_text_times_every_prompt(capsys, monkeypatch) -> None:
    from companion.bench import bench_text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seconds = bench_text(device="cpu", repeats=2)
    text = capsys.readouterr().out
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert "180 prompts (10 classes x 18 templates)" in text and "median" in text


def _tiny_clip(tmp_path):
    """A randomly initialised, tiny CLIP model and processor built locally (no download): for the code path only."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1} | {
        t: i + 2 for i, t in enumerate(letters + [c + "</w>" for c in letters])
    }
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "eos_token_id": 1,
            "bos_token_id": 0,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def test_clip_zero_shot_runs_a_hugging_face_clip(tmp_path) -> None:
    from companion.llm import clip_zero_shot

    model, processor = _tiny_clip(tmp_path)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    pred = clip_zero_shot(model, processor, images, ["cat", "dog", "ship"], TEMPLATES[:2], batch_size=3)
    assert pred.shape == (7,) and pred.dtype == torch.long and 0 <= pred.min() and pred.max() < 3
    with torch.inference_mode():  # the same prediction, written out with CLIP's own forward pass
        prompts = [t.format(c) for c in ["cat", "dog", "ship"] for t in TEMPLATES[:2]]
        out = model(
            **processor(
                text=prompts, images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt", padding=True
            )
        )
        text = F.normalize(out.text_embeds.view(3, 2, -1).mean(1), dim=-1)
    assert torch.equal(pred, (out.image_embeds @ text.T).argmax(1))
    with pytest.raises(ValueError, match="uint8 of shape"):
        clip_zero_shot(model, processor, images.float(), ["cat"], TEMPLATES[:1])


class _DeviceSpy(torch.nn.Module):
    """A stand-in CLIP whose weights live on the meta device: records where its inputs are, answers on the CPU."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(dim, device="meta"))
        self.dim, self.seen = dim, set()

    def _answer(self, inputs: dict) -> torch.Tensor:
        self.seen |= {value.device.type for value in inputs.values()}
        return torch.randn(len(next(iter(inputs.values()))), self.dim)

    def get_text_features(self, **inputs) -> torch.Tensor:
        return self._answer(inputs)

    def get_image_features(self, **inputs) -> torch.Tensor:
        return self._answer(inputs)


def test_clip_zero_shot_sends_the_processor_outputs_to_the_model_device(tmp_path) -> None:
    from companion.llm import clip_zero_shot

    _, processor = _tiny_clip(tmp_path)
    spy = _DeviceSpy()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    pred = clip_zero_shot(spy, processor, images, ["cat", "dog"], TEMPLATES[:2], batch_size=2)
    assert spy.seen == {"meta"}  # every input of the model was moved to its device (a GPU in real use)
    assert pred.shape == (5,) and pred.device.type == "cpu"
