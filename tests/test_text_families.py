"""Text side on every tower family (random-init, shrunk through registered model configs):
SigLIP-style (no causal mask, last-token pooling, its own tokenizer and context), PE-style
(``CustomTextCLIP``, context 32) and EVA-style (``CustomTextCLIP``, context 77); the
tokenizer in the cache key; the offline tokenizer line; the sigmoid text head."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from towers import TinyTokenizer

from sclip_lab import segment, text, text_tower
from sclip_lab.errors import ConfigError

VISION = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32}
SIGLIP = "sclip-tiny-siglip2"
PE = "sclip-tiny-pe"
EVA = "sclip-tiny-eva"
CONFIGS = {
    SIGLIP: {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True, "vision_cfg": VISION,
             "text_cfg": {"context_length": 16, "vocab_size": 100,
                          "hf_tokenizer_name": "timm/ViT-B-16-SigLIP2",
                          "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 64,
                          "heads": 2, "layers": 2, "no_causal_mask": True, "proj_bias": True,
                          "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
                          "act_kwargs": {"approximate": "tanh"}}},
    PE: {"embed_dim": 32, "custom_text": True, "vision_cfg": VISION,
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2,
                      "layers": 2}},
    EVA: {"embed_dim": 32, "custom_text": True, "vision_cfg": VISION,
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                       "layers": 2}},
}
NAMES = ["cat", "person in jacket", "sky", "cat", "a very long name of a thing"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """arch -> random-init model (eval), each config registered with open_clip."""
    root = tmp_path_factory.mktemp("family-configs")
    models = {}
    for arch, cfg in CONFIGS.items():
        path = root / f"{arch}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
        torch.manual_seed(0)
        models[arch] = open_clip.create_model(arch).eval()
    return models


def tokenizer_of(arch):
    return TinyTokenizer() if arch == SIGLIP else open_clip.get_tokenizer(arch)


def reference(model, tok, names, templates) -> torch.Tensor:
    """The lab's definition (docs/protocol.md §4) on ``model.encode_text``: ``(Q, E)``."""
    rows = []
    with torch.no_grad():
        for n in names:
            e = F.normalize(model.encode_text(tok([t(n) for t in templates])), dim=-1)
            rows.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(rows)


@pytest.mark.parametrize("arch", [SIGLIP, PE, EVA])
def test_query_embeddings_equal_encode_text(families, arch):
    model, tok = families[arch], tokenizer_of(arch)
    tmpl = text.get_templates("openai_imagenet")[:12]
    got = text.query_embeddings(model, tok, NAMES, tmpl, torch.device("cpu"), batch_tokens=96)
    torch.testing.assert_close(got, reference(model, tok, NAMES, tmpl), rtol=1e-5, atol=1e-6)


def test_siglip_tower_is_encoded_whole_and_pe_shares_prefixes(families, monkeypatch):
    siglip, pe = (text_tower.text_module(families[a]) for a in (SIGLIP, PE))
    assert not text_tower.causal_clip_text(siglip)  # bidirectional, last-token pooled
    assert text_tower.causal_clip_text(pe) and pe is families[PE].text
    calls = []
    real = text_tower.prefix_plan
    monkeypatch.setattr(text_tower, "prefix_plan", lambda *a: calls.append(a[0]) or real(*a))
    for arch in (SIGLIP, PE):
        text.query_embeddings(families[arch], tokenizer_of(arch), ["cat"],
                              text.get_templates("single"), torch.device("cpu"))
    assert calls == [pe]


def test_truncated_encode_text_on_a_custom_text_tower(families):
    tokens = open_clip.get_tokenizer(PE)(["a photo of a cat.", "a long prompt about a dog."])
    assert tokens.shape == (2, 32)
    with torch.no_grad():
        torch.testing.assert_close(text.encode_text(families[PE], tokens),
                                   families[PE].encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_tokenizer_width_must_match_the_context(families):
    with pytest.raises(ConfigError, match=r"takes \(B, 16\)"):
        text.query_embeddings(families[SIGLIP], TinyTokenizer(context_length=64), ["cat"],
                              text.get_templates("single"), torch.device("cpu"))


def test_tokenizer_identity_from_the_config_and_objects(families):
    assert text.tokenizer_identity(SIGLIP) == {"tokenizer": "timm/ViT-B-16-SigLIP2",
                                               "context_length": 16}
    assert text.tokenizer_identity(PE) == {"tokenizer": "SimpleTokenizer", "context_length": 32}
    assert text.tokenizer_identity(EVA) == text.DEFAULT_TOKENIZER
    assert text.tokenizer_identity(TINY, open_clip.get_tokenizer("ViT-B-16")) == \
        text.DEFAULT_TOKENIZER
    assert text.tokenizer_identity(SIGLIP, TinyTokenizer()) == {
        "tokenizer": "test/tiny-sentencepiece", "context_length": 16}


def test_cache_key_holds_the_tokenizer(families, tmp_path):
    dev, model = torch.device("cpu"), families[SIGLIP]
    a = text.classifier(model, SIGLIP, ["cat"], "single", dev, tmp_path, TinyTokenizer())
    text.register_tokenizer(SIGLIP, TinyTokenizer(vocab=50))
    try:  # same name and context: the same entry, read back without tokenising
        b = text.classifier(model, SIGLIP, ["cat"], "single", dev, tmp_path)
    finally:
        text.register_tokenizer(SIGLIP, None)
    assert torch.equal(a, b) and len(list(tmp_path.glob("*.pt"))) == 1
    other = TinyTokenizer()
    other.name = "test/another-tokenizer"
    text.classifier(model, SIGLIP, ["cat"], "single", dev, tmp_path, other)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_offline_hub_tokenizer_is_one_line(families, monkeypatch):
    with pytest.raises(ConfigError) as real:  # here: no transformers, or no hub
        text.tokenizer_for(SIGLIP)
    line = str(real.value)
    assert "(timm/ViT-B-16-SigLIP2)" in line and "\n" not in line and len(line) <= 300

    def offline(arch):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    with pytest.raises(ConfigError) as e:
        text.tokenizer_for(SIGLIP)
    assert str(e.value) == (
        f"the {SIGLIP} tokenizer (timm/ViT-B-16-SigLIP2) is not in the local Hugging Face "
        "cache and the hub is offline: go online once or set HF_HOME to a cache that has it")
    assert text.tokenizer_for(SIGLIP, TinyTokenizer()).name == TinyTokenizer.name


def test_sigmoid_scores_use_the_models_scale_and_bias(families, tiny_model):
    siglip = families[SIGLIP]
    with torch.no_grad():
        siglip.logit_bias.fill_(-3.0)
    assert text.score_rule("softmax", siglip, SIGLIP) is None  # the default: today's numbers
    head = text.score_rule("sigmoid", siglip, SIGLIP)
    assert head.scale == pytest.approx(float(siglip.logit_scale.detach().exp()))
    assert head.bias == -3.0
    cos = torch.tensor([[0.1, 0.3], [0.2, -0.1]])
    post = segment.PostProcess(torch.arange(2), 2, 40.0, sigmoid=(head.scale, head.bias))
    torch.testing.assert_close(segment.query_probabilities(cos, post),
                               torch.sigmoid(cos * head.scale - 3.0))
    with pytest.raises(ConfigError, match="needs a sigmoid backbone"):
        text.score_rule("sigmoid", tiny_model, TINY)
    with pytest.raises(ConfigError, match="unknown text.scores='tanh'"):
        text.score_rule("tanh", siglip, SIGLIP)
