"""Trunk features by name: a method that needs a new trunk feature is its own module.

The toy method here (attention biased by each key token's norm) needs a feature no file of
the package knows: its provider, its attention function and its config entry are all
registered from this test module, and it runs through ``run`` (``variants=``, the trunk
cache) like any shipped method.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, evaluate_in_process
from safetensors import safe_open
from synthetic import write_benchmark
from torch import Tensor

from sclip_lab import attention as attn
from sclip_lab import features, segment
from sclip_lab.attention import AttentionInputs, attention_qkv
from sclip_lab.features import TrunkOutput, register_feature
from sclip_lab.knobs import Knob
from sclip_lab.pipeline import Head, Preprocess, Segmenter, build_last_block
from sclip_lab.trunk_cache import SUFFIX, open_cache

NORM, FRESH, METHOD = "test_patch_norm", "test_patch_norm_fresh", "test_norm_bias"
SOURCES = (NORM, f"{NORM}.1", FRESH)  # the feature the method reads: a knob of its own
CALLS: list[tuple[str, str | None, int]] = []  # (kind, arg, windows) per provider call


def patch_norm(ctx: features.FeatureContext, arg: str | None) -> Tensor:
    """``(B, N)`` the p-norm of every token of the last block's input (``arg``: p, 2)."""
    return ctx.x.norm(p=float(arg or 2), dim=-1)


def counted(kind: str):
    def fn(ctx: features.FeatureContext, arg: str | None) -> Tensor:
        CALLS.append((kind, arg, len(ctx.x)))
        return patch_norm(ctx, arg)
    return fn


def norm_bias(x: AttentionInputs, weight: float = 1.0, source: str = NORM) -> Tensor:
    """softmax(q kᵀ / 8 + weight · the key token's standardised norm)."""
    norm = x.named[source].float()  # (B, N)
    bias = weight * (norm - norm.mean(-1, keepdim=True)) / norm.std(-1, keepdim=True)
    scores = (x.q @ x.k.transpose(-2, -1)).float() / attn.HEAD_TEMPERATURE
    return (scores + bias[:, None, None, :]).softmax(-1).to(x.q.dtype)  # (B, heads, N, N)


@pytest.fixture(scope="module")
def toy():
    """The provider (cached), its cache=False twin, the method and its ``conf/attention``
    entry, registered for this module only."""
    from hydra.core.config_store import ConfigStore

    register_feature(NORM, counted(NORM))
    register_feature(FRESH, counted(FRESH), cache=False)
    knobs = [Knob("weight", "float", 1.0, "bias scale"),
             Knob("source", "choice", NORM, "feature read", choices=SOURCES)]
    attn.register_attention(METHOD, knobs=knobs, features=lambda k: (k["source"],))(norm_bias)
    store = ConfigStore.instance()  # what conf/attention/<name>.yaml would say
    store.store(group="attention", name=METHOD, node={
        "defaults": ["base_attention", "_self_"], "name": METHOD,
        **{k.name: k.default for k in knobs}})
    yield
    del store.repo["attention"][f"{METHOD}.yaml"]
    attn.ATTENTIONS.pop(METHOD)
    for kind in (NORM, FRESH):
        features.PROVIDERS.pop(kind)


@pytest.fixture(autouse=True)
def calls():
    CALLS.clear()
    return CALLS


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 96, 112, generator=torch.Generator().manual_seed(7))


def test_the_trunk_computes_a_declared_feature_that_the_method_reads(enc, images, toy,
                                                                     calls):
    last = build_last_block({"name": METHOD, "weight": 0.5}, None, enc)
    assert last.features == (NORM,)
    with torch.no_grad():
        plain = enc.trunk(images)
        trunk = enc.trunk_for(images, last)
        got = enc.last_attention(trunk, last)
        block = enc.visual.transformer.resblocks[-1]
        q, k, _ = attention_qkv(block, block.ln_1(trunk.x))
    assert not plain.named and calls == [(NORM, None, 2)]  # only when asked, once a batch
    with pytest.raises(ValueError, match=f"reading the features .'{NORM}'. was given a trunk"):
        enc.last_attention(plain, last)
    norm = trunk.x.norm(dim=-1)
    torch.testing.assert_close(trunk.named[NORM], norm)
    bias = 0.5 * (norm - norm.mean(-1, keepdim=True)) / norm.std(-1, keepdim=True)
    want = ((q @ k.transpose(-2, -1)) / 8 + bias[:, None, None, :]).softmax(-1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    arg = build_last_block({"name": METHOD, "source": f"{NORM}.1"}, None, enc)
    with torch.no_grad():
        one = enc.trunk_for(images, arg).named[f"{NORM}.1"]
    torch.testing.assert_close(one, trunk.x.abs().sum(-1))  # ``kind.arg``: the provider's arg


def test_kinds_are_checked_where_they_are_registered_and_declared(enc, toy):
    with pytest.raises(ValueError, match="an identifier other than"):
        register_feature("hidden", patch_norm)
    with pytest.raises(KeyError, match="already registered"):
        register_feature(NORM, patch_norm)
    for name, message in (("test_nobody", "no feature provider for 'test_nobody'"),
                          ("hidden.2", "built in: declare it with")):
        attn.register_attention("test_reads_unknown", features=lambda k, n=name: (n,))(
            attn.vanilla)
        try:
            with pytest.raises(ValueError, match=message):
                build_last_block({"name": "test_reads_unknown"}, None, enc)
        finally:
            attn.ATTENTIONS.pop("test_reads_unknown")


def test_a_provider_returns_one_row_per_window(enc, images):
    register_feature("test_first_row", lambda ctx, arg: ctx.x[0])
    try:
        with pytest.raises(ValueError, match="must return a .B, .... tensor with B=2"):
            enc.trunk(images, features=("test_first_row",))
    finally:
        features.PROVIDERS.pop("test_first_row")


def test_named_features_stay_window_aligned_through_select_and_cat():
    x = torch.randn(5, 3, 4)
    trunk = TrunkOutput(x, (1, 2), named={"a": torch.arange(5), "b": x[:, :, 0]})
    parts = [trunk.select(0, 2), trunk.select(2, 5)]
    assert torch.equal(parts[1].named["a"], torch.tensor([2, 3, 4]))
    joined = TrunkOutput.cat(parts)
    assert all(torch.equal(joined.named[k], trunk.named[k]) for k in "ab")


def segmenter(enc, sections, batch_size=2) -> Segmenter:
    queries = F.normalize(torch.randn(4, enc.visual.proj.shape[1],
                                      generator=torch.Generator().manual_seed(1)), dim=-1)
    post = segment.PostProcess(torch.arange(4), 4, 40.0, 0.0, None)
    return Segmenter(enc, [Head(build_last_block(s, None, enc)) for s in sections], queries,
                     post, Preprocess(64, 64, 32), batch_size)


RESIZED = [torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(2))]  # 3 windows


def test_the_segmenter_computes_each_feature_once_per_window_for_all_heads(enc, toy, calls):
    heads = [{"name": "vanilla"}, {"name": METHOD}, {"name": METHOD, "weight": 2.0},
             {"name": METHOD, "source": f"{NORM}.1"}]
    seg = segmenter(enc, heads)
    assert seg.feature_names(seg.heads) == (NORM, f"{NORM}.1")
    seg.logits_many(RESIZED, [(64, 128)])
    # three windows in batches of two, each name once per batch for the heads that read it
    assert calls == [(NORM, None, 2), (NORM, "1", 2), (NORM, None, 1), (NORM, "1", 1)]
    calls.clear()
    segmenter(enc, heads[:1]).logits_many(RESIZED, [(64, 128)])
    assert calls == []  # no head asks: never computed


def test_the_trunk_cache_stores_features_by_name_and_recomputes_uncached_ones(
        enc, toy, calls, tmp_path):
    info = {"arch": "sclip-tiny-vit", "pretrained": "tiny.pt", "weights_sha256": "cd" * 32,
            "precision": "fp32", "device": "cpu"}
    sections = [{"name": METHOD}, {"name": METHOD, "source": FRESH}]
    want = segmenter(enc, sections).logits_many(RESIZED, [(64, 128)])
    seg = segmenter(enc, sections)
    seg.trunk_cache = open_cache(tmp_path, "fp32", enc, info, asdict(seg.prep))
    for hits in (0, 1):
        calls.clear()
        got = seg.logits_many(RESIZED, [(64, 128)])
        assert seg.trunk_cache.hits == hits
        assert all(torch.equal(a, b) for ha, hb in zip(got, want) for a, b in zip(ha, hb))
        assert {kind for kind, _, _ in calls} == ({NORM, FRESH} if hits == 0 else {FRESH})
    (entry,) = tmp_path.rglob(f"*{SUFFIX}")
    with safe_open(str(entry), "pt") as f:
        assert {k.split(".", 1)[1] for k in f.keys()} == {"x", NORM}  # FRESH: never stored


def windows_of(kind: str) -> list[int]:
    """The window counts of ``kind``'s provider calls so far, in order."""
    return [n for k, _, n in CALLS if k == kind]


def test_a_method_from_a_test_module_runs_through_run_with_the_trunk_cache(
        tiny_inproc, tmp_path, toy, calls):
    root, cache = tmp_path / "data", tmp_path / "trunks"
    write_benchmark(root, "voc21", num_images=2, size=(64, 96))
    variants = (f"variants=['attention=vanilla','attention={METHOD} attention.weight=0',"
                f"'attention={METHOD} attention.weight=2',"
                f"'attention={METHOD} attention.weight=2 attention.source={FRESH}']")
    base = [*tiny_inproc, f"data_root={root}", "attention=vanilla"]
    evaluate_in_process([*base, f"trunk_cache={cache}"], tmp_path / "cold")
    assert calls == []  # vanilla alone: no feature computed, none stored
    plain = evaluate_in_process([*base, variants], tmp_path / "plain")
    batches = windows_of(NORM)
    assert batches and batches == windows_of(FRESH)  # once a batch, for both of its heads
    calls.clear()
    warm = evaluate_in_process([*base, variants, f"trunk_cache={cache}"], tmp_path / "warm")
    # vanilla's entries held no feature: recomputed once with it
    assert windows_of(NORM) == batches == windows_of(FRESH)
    calls.clear()
    again = evaluate_in_process([*base, variants, f"trunk_cache={cache}"], tmp_path / "again")
    assert windows_of(NORM) == [] and windows_of(FRESH) == batches  # read; cache=False: not
    assert (warm[0]["timings"]["trunk_cache_misses"], again[0]["timings"]["trunk_cache_hits"]
            ) == (2, 2)
    assert [r["summary"].get("weight") for r in plain] == [None, 0.0, 2.0, 2.0]
    for rec in (*warm, *again):
        (same,) = [p for p in plain if p["key"] == rec["key"]]
        assert rec["metrics"] == same["metrics"]  # read from the cache = computed
    assert plain[1]["metrics"] == plain[0]["metrics"]  # weight 0: vanilla's attention
    assert plain[2]["metrics"] != plain[0]["metrics"]
    for entry in cache.rglob(f"*{SUFFIX}"):
        with safe_open(str(entry), "pt") as f:
            assert {k.split(".", 1)[1] for k in f.keys()} == {"x", NORM}


def test_no_file_of_the_package_or_its_configs_knows_the_toy_method():
    files = [*(REPO / "src").rglob("*.py"), *(REPO / "conf").rglob("*.yaml")]
    assert not [p for p in files if NORM in p.read_text() or METHOD in p.read_text()]
    assert not (REPO / "conf" / "attention" / f"{METHOD}.yaml").exists()


def test_a_new_kind_in_an_entry_of_another_process_is_left_out_of_the_union():
    assert features.cached_names(["test_unregistered", "test_unregistered.3"]) == ()

