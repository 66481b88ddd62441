"""Training on a micro city: every head learns, CRN starts from NetVLAD, resume is exact."""

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
from torch.utils.data import DataLoader

from vpr.shared.checkpoints import load_checkpoint
from vpr.shared.descriptors import image_transform
from vpr.shared.shardio import ShardReader
from vpr.shared.splits import load_split
from vpr.shared.triplets import TripletImages, triplet_loss
from vpr.steps.initialise import build_training_model
from vpr.steps.mining.negatives import mine_triplets
from vpr.steps.train import train_head


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def trained_netvlad(micro_project):
    root, cfg, layout = micro_project
    summary = train_head("netvlad", cfg, layout)
    assert summary["epochs"] == cfg.train.epochs
    return micro_project


@pytest.mark.parametrize("head", ["avg", "gem", "netvlad", "crn", "crn2"])
def test_each_head_loss_goes_down(trained_netvlad, head):
    root, cfg, layout = trained_netvlad
    torch.manual_seed(0)
    reader = ShardReader(layout.shards_dir)
    train = load_split(reader.index, pl.read_parquet(layout.mining("train")), "train")
    tf = image_transform(cfg.shards.height, cfg.shards.width)
    model = build_training_model(head, cfg, layout, reader, train, tf, torch.device("cpu"))
    chunk = np.arange(min(4, len(train.q_ids)))
    triplets = mine_triplets(model, reader, train, chunk, tf, cfg, torch.device("cpu"), np.random.default_rng(0))
    ids = np.concatenate([train.q_ids[chunk][:, None], train.db_ids[triplets]], axis=1)
    batch = next(iter(DataLoader(TripletImages(reader, ids, tf, tf), batch_size=len(chunk))))
    b, n = batch.shape[:2]
    flat = batch.flatten(0, 1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = triplet_loss(model(flat).view(b, n, -1), cfg.train.margin)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0
    assert losses[-1] < losses[0], losses


def test_training_writes_checkpoint_history_and_crn_needs_netvlad(micro_project):
    root, cfg, layout = micro_project
    with pytest.raises(FileNotFoundError, match="netvlad"):
        train_head("crn", cfg, layout)
    train_head("avg", cfg, layout)
    ckpt = load_checkpoint(layout.checkpoint("avg"))
    assert ckpt["head"] == "avg" and 1 <= ckpt["epoch"] <= cfg.train.epochs
    live = layout.live_dir("avg")  # dvclive's layout: what `dvc plots` and `dvc exp show` read
    loss = pl.read_csv(live / "plots/metrics/train/loss.tsv", separator="\t")
    assert loss["step"].to_list() == list(range(1, cfg.train.epochs + 1)) and loss["loss"].is_finite().all()
    for name in ("recall@1", "recall@5", "recall@10", "recall@20"):
        assert pl.read_csv(live / f"plots/metrics/val/{name}.tsv", separator="\t").height == cfg.train.epochs
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == cfg.train.epochs and 0.0 <= summary["val"]["recall@5"] <= 100.0


def test_resume_after_interruption_reproduces_uninterrupted_run(micro_project, tmp_path):
    import shutil

    from vpr.foundations.layout import Layout

    root, cfg, layout = micro_project
    other = tmp_path / "other"
    shutil.copytree(root, other)
    layout_b = Layout.from_config(cfg, other)

    train_head("gem", cfg, layout)  # uninterrupted
    batches_per_epoch = -(-cfg.train.queries_per_epoch // cfg.train.batch_queries)
    out = train_head("gem", cfg, layout_b, stop_after_batches=batches_per_epoch + 1)  # dies inside epoch 2
    assert out["interrupted"] and out["epoch"] == 2
    train_head("gem", cfg, layout_b, resume=True)

    a, b = load_checkpoint(layout.last_checkpoint("gem")), load_checkpoint(layout_b.last_checkpoint("gem"))
    assert a["epoch"] == b["epoch"] == cfg.train.epochs
    assert _state_equal(a["model"], b["model"])
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]
    assert _state_equal(
        load_checkpoint(layout.checkpoint("gem"))["model"], load_checkpoint(layout_b.checkpoint("gem"))["model"]
    )


def test_trunk_cache_matches_full_forward_and_is_shared_by_the_heads(micro_project, tmp_path):
    from vpr.foundations.config import ModelConfig
    from vpr.shared.descriptors import extract
    from vpr.shared.models import build_model
    from vpr.shared.trunk import cache_key, open_trunk_cache

    root, cfg, layout = micro_project
    reader = ShardReader(layout.shards_dir)
    mcfg = ModelConfig(weights="none", gem_dim=32, netvlad_clusters=4)
    model = build_model("gem", mcfg)
    tf = image_transform(cfg.shards.height, cfg.shards.width)
    ids = reader.index.sort("shard", "offset")["id"].to_numpy()[:10]  # the first ten images, in tar order
    cpu, size = torch.device("cpu"), (cfg.shards.height, cfg.shards.width)
    folder = tmp_path / "trunk"
    cache = open_trunk_cache(model, reader, ids, tf, cpu, size=size, batch_size=4, folder=folder)
    assert cache.cached == 0 and cache.encoded == 0  # nothing is encoded up front
    full = extract(model, reader, ids, tf, device=cpu, batch_size=4)
    # asked for in pieces, in any order: each image encoded once, the same maps as all at once
    assert cache.descriptors(ids[7:2:-1], 3).shape == (5, model.descriptor_dim) and cache.encoded == 5
    # stored in bfloat16: the descriptors are the full forward's up to that rounding
    np.testing.assert_allclose(cache.descriptors(ids[::-1], 3), full[::-1], atol=2e-2)
    assert cache.encoded == 10 and cache.cached == 10
    assert np.abs(cache.descriptors(ids, 3) - full).max() > 0  # the rounding is there (not a float32 cache)
    in_memory = open_trunk_cache(model, reader, ids, tf, cpu, size=size, batch_size=4, folder=None)
    assert torch.equal(in_memory.get(ids), cache.get(ids))  # encoded all at once: the same bits
    with pytest.raises(KeyError):
        cache.get(np.array([999]))
    (key,) = [p for p in folder.iterdir() if p.is_dir()]
    segments = sorted(key.glob("seg-*.pt"))
    assert len(segments) == 2

    # another head of the same run: the same trunk, so the same folder, read instead of encoded
    netvlad = build_model("netvlad", mcfg)
    assert cache_key(netvlad, reader, ids, size) == key.name
    again = open_trunk_cache(netvlad, reader, ids[::-1], tf, cpu, size=size, batch_size=4, folder=folder)
    assert again.cached == 10 and torch.equal(again.get(ids), cache.get(ids)) and again.encoded == 0
    assert sorted(key.glob("seg-*.pt")) == segments

    # other trunk weights, another input size or other image bytes: another key
    other = build_model("gem", mcfg, seed=1)
    assert cache_key(other, reader, ids, size) != key.name
    assert cache_key(model, reader, ids, (size[0] // 2, size[1] // 2)) != key.name
    assert cache_key(model, reader, ids[:5], size) != key.name
    # a damaged segment is set aside and its images encoded again, not trusted
    maps = in_memory.get(ids)
    del cache, again  # a file truncated in place under a mapping would fault its readers (writers rename)
    segments[0].write_bytes(b"not a cache")
    rebuilt = open_trunk_cache(model, reader, ids, tf, cpu, size=size, batch_size=4, folder=folder)
    assert rebuilt.cached == 5 and segments[0].with_name(segments[0].name + ".damaged").exists()
    assert torch.equal(rebuilt.get(ids), maps) and rebuilt.encoded == 5


def test_trunk_cache_segments_are_merged_and_shared_between_processes(micro_project, tmp_path):
    """Many small encodes stay a bounded number of files; a second process reads what the first wrote."""
    from vpr.foundations.config import ModelConfig
    from vpr.shared import trunk
    from vpr.shared.models import build_model

    root, cfg, layout = micro_project
    reader = ShardReader(layout.shards_dir)
    model = build_model("avg", ModelConfig(weights="none"))
    tf = image_transform(cfg.shards.height, cfg.shards.width)
    ids = np.sort(reader.index["id"].to_numpy())[: trunk.MAX_SEGMENTS + 4]
    size, folder = (cfg.shards.height, cfg.shards.width), tmp_path / "trunk"
    cache = trunk.open_trunk_cache(model, reader, ids, tf, torch.device("cpu"), size=size, batch_size=4, folder=folder)
    for i in ids:  # one image per call: one segment each, merged past MAX_SEGMENTS
        cache.get(np.array([i]))
    (key,) = [p for p in folder.iterdir() if p.is_dir()]
    assert 1 <= len(list(key.glob("seg-*.pt"))) <= trunk.MAX_SEGMENTS and cache.encoded == len(ids)
    whole = trunk.open_trunk_cache(model, reader, ids, tf, torch.device("cpu"), size=size, batch_size=4, folder=None)
    assert torch.equal(cache.get(ids), whole.get(ids))
    code = (
        "import sys, numpy as np, torch\n"
        "from vpr.foundations.config import ModelConfig\n"
        "from vpr.shared.descriptors import image_transform\n"
        "from vpr.shared.models import build_model\n"
        "from vpr.shared.shardio import ShardReader\n"
        "from vpr.shared.trunk import open_trunk_cache\n"
        f"reader = ShardReader({str(layout.shards_dir)!r})\n"
        f"tf = image_transform({cfg.shards.height}, {cfg.shards.width})\n"
        "model = build_model('avg', ModelConfig(weights='none'))\n"
        f"ids = np.array({ids.tolist()})\n"
        f"c = open_trunk_cache(model, reader, ids, tf, torch.device('cpu'), size={size}, batch_size=4, "
        f"folder=__import__('pathlib').Path({str(folder)!r}))\n"
        "torch.save(c.get(ids), sys.argv[1]); print(c.encoded)\n"
    )
    out = tmp_path / "maps.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0" and torch.equal(torch.load(out), whole.get(ids))


def test_precision_setting_and_bf16_step_agree_with_fp32(micro_project):
    from vpr.shared.descriptors import autocast, use_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_bf16(cpu, "fp32") and use_bf16(cpu, "bf16")
    # auto never changes CPU arithmetic with the CPU's model: the same seed trains alike on every CPU
    assert not use_bf16(cpu, "auto") and use_bf16(cuda, "auto")
    assert not use_bf16(cuda, "fp32")

    root, cfg, layout = micro_project
    torch.manual_seed(0)
    reader = ShardReader(layout.shards_dir)
    train = load_split(reader.index, pl.read_parquet(layout.mining("train")), "train")
    tf = image_transform(cfg.shards.height, cfg.shards.width)
    model = build_training_model("netvlad", cfg, layout, reader, train, tf, cpu).train()
    chunk = np.arange(min(4, len(train.q_ids)))
    triplets = mine_triplets(model, reader, train, chunk, tf, cfg, cpu, np.random.default_rng(0))
    ids = np.concatenate([train.q_ids[chunk][:, None], train.db_ids[triplets]], axis=1)
    batch = next(iter(DataLoader(TripletImages(reader, ids, tf, tf), batch_size=len(chunk))))
    flat = batch.flatten(0, 1)
    desc = {}
    for bf16 in (False, True):
        with autocast(cpu, bf16):
            desc[bf16] = model(flat).float()
    assert desc[True].dtype == torch.float32 and torch.isfinite(desc[True]).all()
    assert not torch.equal(desc[True], desc[False])  # autocast really ran the convolutions in bf16
    cosine = (desc[True] * desc[False]).sum(1)  # both L2-normalised
    assert cosine.min() > 0.99, cosine.min()
    b, n = batch.shape[:2]
    losses = [triplet_loss(desc[k].view(b, n, -1), cfg.train.margin).item() for k in (False, True)]
    assert abs(losses[0] - losses[1]) < 0.01, losses


def test_the_gpu_branches_run_on_cpu_through_the_same_training_code(micro_project):
    """channels_last, bf16 autocast, torch.compile (inductor) and pinned-memory loader workers: what a GPU run
    switches on, forced on here, so a typo in those branches fails this test, not a user's first GPU run."""
    import warnings

    import torch._dynamo

    root, cfg, layout = micro_project
    gpu_like = cfg.train.model_copy(
        update={
            "epochs": 1,
            "cache_frozen_trunk": "off",  # the GPU path: whole-image steps through the compiled model
            "compile": True,
            "channels_last": "on",
            "precision": "bf16",
            "pin_memory": "on",
            "workers": 2,
        }
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")  # no accelerator: torch ignores the request
        summary = train_head("gem", cfg.model_copy(update={"train": gpu_like}), layout)
    assert summary["epochs"] == 1 and np.isfinite(summary["history"][0]["loss"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step ran compiled
    state = load_checkpoint(layout.checkpoint("gem"))["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
