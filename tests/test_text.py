"""Text classifier: queries from synonyms, template averaging, truncated and prefix-shared
encoding, cache (per vocabulary, rows shared between vocabularies)."""

from __future__ import annotations

import hashlib
import json
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from sclip_lab import text, text_tower

# Names of several token lengths, a repeat, and a synonym line's pieces.
NAMES = ["cat", "person in jacket", "television monitor", "sky", "cat", "pottedplant",
         "a very long descriptive name of a thing with many words in it"]


def reference_queries(model, names, templates) -> torch.Tensor:
    """The definition, one name at a time on the full 77-token context: ``(Q, E)``."""
    tok = open_clip.get_tokenizer(TINY)
    rows = []
    with torch.no_grad():
        for name in names:
            e = F.normalize(model.encode_text(tok([t(name) for t in templates])), dim=-1)
            rows.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(rows)


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


@pytest.mark.parametrize("batch_tokens", [7, 1024])  # one prompt per batch … all at once
def test_query_embeddings_equal_the_per_name_reference(tiny_model, batch_tokens):
    tok = open_clip.get_tokenizer(TINY)
    tmpl = text.get_templates("surgery85")
    emb = text.query_embeddings(tiny_model, tok, NAMES, tmpl, torch.device("cpu"),
                                batch_tokens=batch_tokens)
    torch.testing.assert_close(emb, reference_queries(tiny_model, NAMES, tmpl),
                               rtol=1e-5, atol=1e-6)


def test_prefix_sharing_is_exact_for_any_grouping(tiny_model):
    tok = open_clip.get_tokenizer(TINY)
    tokens = tok([t(n) for n in NAMES[:4] for t in text.get_templates("openai_imagenet")[:9]])
    with torch.no_grad():
        ref = tiny_model.encode_text(tokens)
    groups = torch.randint(0, 3, (len(tokens),), generator=torch.Generator().manual_seed(0))
    done = []
    got = text_tower.encode_prompts(tiny_model, tokens, groups, 64, done.append)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert sum(done) == len(tokens) and len(done) > 1


def test_common_prefix_leaves_the_eot_outside():
    tokens = torch.tensor([[9, 5, 6, 99, 0], [9, 5, 7, 8, 99], [9, 5, 99, 0, 0]])
    assert text_tower.common_prefix(tokens) == 2
    assert text_tower.common_prefix(tokens[:1]) == 3  # one prompt: all but its EOT


def test_token_batches_respect_the_budget():
    lens = torch.tensor([1, 2, 2, 3, 5, 9])
    batches = text_tower.token_batches(torch.arange(6), lens, budget=6)
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3], [4], [5]]  # 9 > 6 still runs


def test_progress_bar_and_rate_line(tiny_model, caplog, capsys):
    tok = open_clip.get_tokenizer(TINY)
    tmpl = text.get_templates("openai_imagenet")
    caplog.set_level(logging.INFO, logger="sclip_lab.text")
    text.query_embeddings(tiny_model, tok, [f"thing {i}" for i in range(8)], tmpl,
                          torch.device("cpu"), desc="text embeddings (one-time, cached in X)")
    assert "text embeddings (one-time, cached in X)" in capsys.readouterr().err
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("text embeddings: 640 prompts (8 names × 80 templates) in ")
    assert line.endswith(" prompts/s")


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


def test_cache_key_is_unchanged(tiny_model, tmp_path):
    """Entries written before prefix sharing keep their file name (and stay readable)."""
    names = ["cat", "dog"]
    text.classifier(tiny_model, TINY, names, "single", torch.device("cpu"), tmp_path)
    src = json.dumps({"weights": text.tower_fingerprint(tiny_model), "arch": TINY,
                      "dtype": "torch.float32", "names": names,
                      "templates": ["a photo of a {}."]})
    key = hashlib.sha256(src.encode()).hexdigest()[:24]
    assert [p.name for p in tmp_path.iterdir()] == [f"text-{key}.pt"]
    legacy = {"names": names, "embeddings": torch.eye(2, 32)}  # no family: the old layout
    torch.save(legacy, tmp_path / f"text-{key}.pt")
    assert torch.equal(text.classifier(tiny_model, TINY, names, "single",
                                       torch.device("cpu"), tmp_path), legacy["embeddings"])


def test_new_vocabulary_reuses_cached_names(tiny_model, tmp_path, monkeypatch):
    dev = torch.device("cpu")
    big = text.classifier(tiny_model, TINY, ["sky", "cat", "dog"], "openai_imagenet", dev,
                          tmp_path)
    calls = []
    real = text.query_embeddings
    monkeypatch.setattr(text, "query_embeddings",
                        lambda *a, **k: calls.append(list(a[2])) or real(*a, **k))
    sub = text.classifier(tiny_model, TINY, ["dog", "cat"], "openai_imagenet", dev, tmp_path)
    assert calls == [] and torch.equal(sub, big[[2, 1]])
    mixed = text.classifier(tiny_model, TINY, ["cat", "bird"], "openai_imagenet", dev,
                            tmp_path)
    assert calls == [["bird"]] and torch.equal(mixed[0], big[1])
    tmpl = text.get_templates("openai_imagenet")
    torch.testing.assert_close(mixed, reference_queries(tiny_model, ["cat", "bird"], tmpl),
                               rtol=1e-5, atol=1e-6)
    text.classifier(tiny_model, TINY, ["cat"], "single", dev, tmp_path)  # other templates
    assert calls[-1] == ["cat"]


def test_default_tokenizer_keeps_the_old_key(tiny_model, tmp_path):
    """CLIP's own tokenizer at 77, given or not, adds nothing to the key (old caches stay
    valid); another tokenizer's entry is another file."""
    dev = torch.device("cpu")
    text.classifier(tiny_model, TINY, ["cat"], "single", dev, tmp_path)
    text.classifier(tiny_model, TINY, ["cat"], "single", dev, tmp_path,
                    open_clip.get_tokenizer(TINY))
    assert len(list(tmp_path.glob("*.pt"))) == 1
    other = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    other.name = "SimpleTokenizer-other-vocab"
    text.classifier(tiny_model, TINY, ["cat"], "single", dev, tmp_path, other)
    assert len(list(tmp_path.glob("*.pt"))) == 2
