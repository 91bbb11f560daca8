"""Text classifier: queries from synonyms, template averaging, truncated encoding, cache."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from conftest import TINY

from sclip_lab import text


def test_split_queries_keeps_duplicates():
    names, owner = text.split_queries(["sky, wall, bed", "cat", "bed"])
    assert names == ["sky", "wall", "bed", "cat", "bed"]
    assert owner == [0, 0, 0, 1, 2]


def test_templates_are_openai_80_in_order():
    t = text.get_templates("openai_imagenet")
    assert len(t) == 80
    assert t[0]("cat") == "a bad photo of a cat."


def test_truncated_encoding_equals_open_clip(tiny_model):
    tok = open_clip.get_tokenizer(TINY)
    tokens = tok(["a photo of a cat.", "a very long prompt of many words about a dog."])
    with torch.no_grad():
        torch.testing.assert_close(text.encode_text(tiny_model, tokens),
                                   tiny_model.encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_query_embedding_formula(tiny_model):
    tok = open_clip.get_tokenizer(TINY)
    tmpl = text.get_templates("openai_imagenet")[:5]
    emb = text.query_embeddings(tiny_model, tok, ["cat", "dog"], tmpl, torch.device("cpu"),
                                batch_size=2)
    with torch.no_grad():
        e = F.normalize(tiny_model.encode_text(tok([t("dog") for t in tmpl])), dim=-1)
    torch.testing.assert_close(emb[1], F.normalize(e.mean(0), dim=0), rtol=1e-5, atol=1e-6)


def test_cache_keyed_by_weights_names_templates(tiny_model, tmp_path, monkeypatch):
    calls = []
    real = text.query_embeddings
    monkeypatch.setattr(text, "query_embeddings",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    dev = torch.device("cpu")
    a = text.classifier(tiny_model, TINY, ["cat"], "single", dev, tmp_path)
    b = text.classifier(tiny_model, TINY, ["cat"], "single", dev, tmp_path)
    assert torch.equal(a, b) and len(calls) == 1 and len(list(tmp_path.glob("*.pt"))) == 1
    text.classifier(tiny_model, TINY, ["dog"], "single", dev, tmp_path)
    text.classifier(tiny_model, TINY, ["cat"], "openai_imagenet", dev, tmp_path)
    other = open_clip.create_model(TINY)  # other weights
    text.classifier(other, TINY, ["cat"], "single", dev, tmp_path)
    assert len(calls) == 4 and len(list(tmp_path.glob("*.pt"))) == 4
