"""timm's webdataset copies of ImageNet on the HF hub (timm/imagenet-22k-wds, -1k-wds), read as
they are: tiny folders written here in exactly that layout (rwightman/imagenet-12k's
`wds/build_wds.py`: 4-digit shard names, `jpg` + `cls` + `json` with `label_12k`, split
metadata without `num_classes` or a class list, a `train_12k` split labelled from the json), then
read, trained on, fine-tuned from and evaluated."""
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from timm.data import ImageNetInfo

import fake_imagenet as fake
from cvtkit.data.config import DataConfig, RunData
from cvtkit.data.dali_loader import DaliLoader
from cvtkit.data.transforms import AugmentConfig
from cvtkit.data.wds_loader import WdsLoader
from cvtkit.eval import evaluate as evaluation
from cvtkit.models import create_model
from cvtkit.models.weights import read_checkpoint
from cvtkit.shards import ShardFolderError, ShardInfo, ShardSet
from cvtkit.train.cli import pretrain_main
from cvtkit.train.pretrained import initial_state
from cvtkit.train.run_config import InitConfig
from helpers import REPO, TINY_CVT, spawn, train, wait

IN22K = list(ImageNetInfo("imagenet-22k").label_names())  # fall11's 21,841, sorted
IN12K = list(ImageNetInfo("imagenet-12k").label_names())  # 11,821, sorted
IN1K = list(ImageNetInfo("imagenet-1k").label_names())
# 1k classes in 12k and 22k; the last one's 22k index is beyond 12k's 11,821 rows
SHARED = [s for s in IN1K if s in set(IN12K) and s in set(IN22K)][:2] + [
    [s for s in IN1K if s in set(IN12K) and s in set(IN22K)][-1]]
ONLY_22K = next(s for s in IN22K if s not in set(IN12K))  # label_12k -1
TEDDY = "n04399382"  # 1k, but not in fall11's 22k
FT_CONFIG = REPO / "configs" / "finetune" / "tiny_cpu.yaml"


def write_split(out: Path, prefix: str, split: str, shards: list[list[Path]], record) -> list[dict]:
    """Shards `PREFIX-SPLIT-0000.tar` ... as build_wds.py writes them; returns each shard's records."""
    written = []
    for i, files in enumerate(shards):
        records = []
        with wds.TarWriter(str(out / f"{prefix}-{split}-{i:04d}.tar")) as sink:
            for f in files:
                rec = record(f)
                sink.write({"__key__": f.stem, "jpg": f.read_bytes(), "json": rec, "cls": rec["label"]})
                records.append(rec)
        written.append(records)
    return written


def split_entry(prefix, split, written, alt_label=None):
    lengths = [len(r) if alt_label is None else sum(x[alt_label] >= 0 for x in r) for r in written]
    return {"name": split if alt_label is None else f"{split}_12k",
            "filenames": [f"{prefix}-{split}-{i:04d}.tar" for i in range(len(written))],
            "shard_lengths": lengths, "num_samples": sum(lengths), "alt_label": alt_label}


def make_hub22k(root: Path, info_name="_info.json") -> Path:
    """timm/imagenet-22k-wds in miniature: 3 classes of 12k (and 1k) and one outside 12k, 12
    training images each; the training shards shuffled over 3 shards, plus a fourth holding only
    the class outside 12k; validation (4 per 12k class, none of the other, as on the hub) in 2."""
    src = fake.make_colour_classes(root / "src", per_class=12, val_per_class=4, synsets=SHARED + [ONLY_22K])
    shutil.rmtree(src / "val" / ONLY_22K)  # the hub's validation holds 12k classes only
    out = root / "hub22k"
    out.mkdir()

    def record(f: Path) -> dict:
        synset = f.parent.name
        w, h = 40, 40
        return {"label": IN22K.index(synset), "label_12k": IN12K.index(synset) if synset in IN12K else -1,
                "class_name": synset, "width": w, "height": h}

    mixed = sorted(f for s in SHARED for f in (src / "train" / s).glob("*.JPEG"))
    random.Random(0).shuffle(mixed)
    train_shards = [mixed[i::3] for i in range(3)] + [sorted((src / "train" / ONLY_22K).glob("*.JPEG"))]
    val = sorted(f for s in SHARED for f in (src / "val" / s).glob("*.JPEG"))
    random.Random(1).shuffle(val)
    splits = {}
    for split, shards in (("train", train_shards), ("validation", [val[0::2], val[1::2]])):
        written = write_split(out, "imagenet22k", split, shards, record)
        splits[split] = split_entry("imagenet22k", split, written)
        splits[f"{split}_12k"] = split_entry("imagenet22k", split, written, "label_12k")
    (out / info_name).write_text(json.dumps({"name": "imagenet22k", "splits": splits}, indent=4))
    return out


def make_hub1k(root: Path) -> Path:
    """timm/imagenet-1k-wds in miniature (tfds_to_wds.py: no alt_label, json with filename)."""
    synsets = SHARED + [TEDDY]
    src = fake.make_colour_classes(root / "src1k", per_class=8, val_per_class=2, synsets=synsets)
    out = root / "hub1k"
    out.mkdir()

    def record(f: Path) -> dict:
        return {"label": IN1K.index(f.parent.name), "width": 40, "height": 40, "filename": f.name}

    splits = {}
    for split, folder in (("train", "train"), ("validation", "val")):
        files = sorted(f for s in synsets for f in (src / folder / s).glob("*.JPEG"))
        random.Random(2).shuffle(files)
        written = write_split(out, "imagenet1k", split, [files[0::2], files[1::2]], record)
        entry = split_entry("imagenet1k", split, written)
        del entry["alt_label"]
        splits[split] = entry
    (out / "_info.json").write_text(json.dumps({"name": "imagenet1k", "splits": splits}))
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {"root": root, "22k": make_hub22k(root), "1k": make_hub1k(root), "val": root / "src" / "val"}


def expected_labels(folder: Path, split: str, field: str) -> dict[str, int]:
    """key -> label read straight from the tars: `cls`, or the json field (samples below 0 left out)."""
    found = {}
    for tar in sorted(folder.glob(f"*-{split}-*.tar")):
        for sample in wds.tarfile_to_samples()([{"url": str(tar)}]):
            label = int(sample["cls"]) if field == "cls" else json.loads(sample["json"])[field]
            if label >= 0:
                found[sample["__key__"]] = label
    return found


def labels_of(loader) -> dict[str, int]:
    got = {}
    for _, labels, keys in loader:
        for k, label in zip(keys, labels.tolist()):
            assert got.setdefault(k, label) == label, k
    return got


# ---------------------------------------------------------------- in process

def test_hub_folder_reads_as_it_is_with_either_info_name(hub, tmp_path):
    """`_info.json` (the hub's) and `info.json` (build_wds.py's) give the same splits, classes and
    labels: 22k's from `cls`, train_12k's from `label_12k`, its samples outside 12k left out."""
    info_only = make_hub22k(tmp_path, info_name="info.json")
    assert not (info_only / "_info.json").exists()
    seen = []
    for folder in (hub["22k"], info_only):
        info = ShardInfo.read(str(folder))
        assert info.num_classes == 21841 and info.synsets == IN22K
        full, sub = info.split("train"), info.split("train_12k")
        assert (full.num_classes, full.synsets, full.alt_label, full.num_samples) == (21841, IN22K, None, 48)
        assert (sub.num_classes, sub.synsets, sub.alt_label, sub.num_samples) == (11821, IN12K, "label_12k", 36)
        assert [Path(u).name for u in sub.urls] == [f"imagenet22k-train-{i:04d}.tar" for i in range(3)]
        # every sample once, labelled as the split says
        every = WdsLoader(full, 5, train=False, workers=2, with_keys=True)
        assert labels_of(every) == expected_labels(folder, "train", "cls")
        want_12k = expected_labels(folder, "train", "label_12k")
        assert len(want_12k) == 36 and labels_of(WdsLoader(sub, 5, train=False, workers=0, with_keys=True)) == want_12k
        # training: the quota counts the kept samples; none of the class outside 12k comes through
        training = WdsLoader(sub, 4, workers=2, seed=1, with_keys=True)
        got = labels_of(training)
        assert len(training) == 9 and set(got) <= set(want_12k) and all(want_12k[k] == v for k, v in got.items())
        seen.append((labels_of(WdsLoader(info.split("validation_12k"), 4, train=False, workers=0, with_keys=True)),
                     info.split("validation").num_samples))
    assert seen[0] == seen[1] and seen[0][1] == 12


def test_a_sample_whose_json_gives_no_label_is_counted_as_damage(hub, tmp_path):
    """In a json-labelled split, a sample without a readable `label_12k` is skipped and counted,
    as an image that does not decode is; the others keep their labels."""
    out = tmp_path / "damaged"
    out.mkdir()
    files = sorted((hub["val"] / SHARED[0]).glob("*.JPEG"))
    broken = {files[1].stem: b"{not json", files[2].stem: json.dumps({"label": 0}).encode()}
    with wds.TarWriter(str(out / "imagenet22k-train-0000.tar")) as sink:
        for f in files:
            rec = json.dumps({"label": IN22K.index(SHARED[0]), "label_12k": IN12K.index(SHARED[0])}).encode()
            sink.write({"__key__": f.stem, "jpg": f.read_bytes(), "json": broken.get(f.stem, rec),
                        "cls": IN22K.index(SHARED[0])})
    split = {"name": "train_12k", "filenames": ["imagenet22k-train-0000.tar"], "shard_lengths": [4],
             "num_samples": 4, "alt_label": "label_12k"}
    (out / "_info.json").write_text(json.dumps({"name": "imagenet22k", "splits": {"train_12k": split}}))
    loader = WdsLoader(ShardSet.from_info(str(out), "train_12k"), 2, train=False, workers=0, with_keys=True)
    assert labels_of(loader) == {files[0].stem: IN12K.index(SHARED[0]), files[3].stem: IN12K.index(SHARED[0])}
    assert loader.damaged == 2


def test_layouts_that_are_neither_are_one_line(hub, tmp_path, capsys):
    def folder(name: str, info: dict | str, file="_info.json") -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / file).write_text(info if isinstance(info, str) else json.dumps(info))
        return path

    train = json.loads((hub["22k"] / "_info.json").read_text())["splits"]["train"]
    cases = [(folder("nosplits", {"name": "imagenet22k"}), "_info.json: no 'splits'"),
             (folder("listsplits", {"name": "imagenet22k", "splits": []}, "info.json"), "info.json: no 'splits'"),
             (folder("unknown", {"name": "places365", "splits": {"train": train}}),
              "no 'num_classes' or class list, and its name 'places365' is none of timm's"),
             (folder("notjson", "{splits", "info.json"), "info.json: not JSON"),
             (hub["root"] / "src", "no _info.json or info.json")]
    for path, expected in cases:
        with pytest.raises(ShardFolderError, match=expected):
            ShardInfo.read(str(path))
    nofiles = folder("nofiles", {"name": "imagenet22k", "splits": {"train": {"name": "train"}}})
    with pytest.raises(ShardFolderError, match="split 'train' needs 'filenames' and 'shard_lengths'"):
        ShardSet.from_info(str(nofiles), "train")
    altered = folder("altlabel", {"name": "imagenet22k", "splits": {"train": {**train, "alt_label": "label_5k"}}})
    with pytest.raises(ShardFolderError, match="takes its labels from 'label_5k', whose class list is unknown"):
        ShardSet.from_info(str(altered), "train")

    # through pretrain/train.py: one line, exit 2
    for path, expected in cases[:1] + cases[2:3]:
        assert pretrain_main(["--config", str(REPO / "configs/pretrain/tiny_cpu.yaml"), "--set",
                              f"data.train={path}", f"out_dir={tmp_path / 'runs'}"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"data.train: {path}/" in errors[0] and expected in errors[0], errors

    # a validation split that labels other classes than the training split
    cfg = DataConfig(train=str(hub["22k"]), train_split="train_12k", val=str(hub["22k"]))
    with pytest.raises(ShardFolderError, match="data.val_split 'validation' of .* labels 21841 classes, not the 11821"):
        RunData.open(cfg)
    assert RunData.open(DataConfig(train=str(hub["22k"]), train_split="train_12k", val=str(hub["22k"]),
                                   val_split="validation_12k")).num_classes == 11821


def test_dali_reads_cls_and_refuses_a_json_labelled_split(hub):
    plain = AugmentConfig(kind="none")
    dali = DaliLoader(ShardSet.from_info(str(hub["22k"]), "train"), 4, 32, workers=1, augment=plain, device="cpu")
    labels = Counter(label for _, batch in dali for label in batch.tolist())
    assert labels == Counter(expected_labels(hub["22k"], "train", "cls").values())
    with pytest.raises(ShardFolderError, match="split 'train_12k' takes its labels from each sample's json "
                                               "field 'label_12k', which data.format dali cannot read"):
        DaliLoader(ShardSet.from_info(str(hub["22k"]), "train_12k"), 4, 32, device="cpu")
    with pytest.raises(ShardFolderError, match="data.format dali cannot read"):
        RunData.open(DataConfig(format="dali", train=str(hub["22k"]), train_split="train_12k"))


def test_verify_and_make_ffcv_refuse_what_they_cannot_check_or_label(hub, tmp_path, capsys):
    from cvtkit.prep.beton import write_beton
    from cvtkit.prep.cli import verify_shards_main
    assert verify_shards_main([str(hub["22k"])]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no shard_sha256 or num_classes: not made by make_shards.py" in errors[0], errors
    with pytest.raises(ShardFolderError, match="split 'train_12k' is labelled from each sample's json field "
                                               "'label_12k'; make_ffcv writes splits labelled by cls only"):
        write_beton(hub["22k"], "train_12k", tmp_path / "train_12k.beton", workers=1)


@pytest.mark.slow
def test_loader_benchmark_reads_a_hub_folder(hub, capsys):
    from cvtkit.bench.loaders import main as bench_main
    common = ["--shards", str(hub["22k"]), "--batches", "2", "--repeats", "1", "--workers", "0", "--size", "32",
              "--batch-size", "4"]
    bench_main(common + ["--split", "train"])
    out = capsys.readouterr().out
    for row in ("WdsLoader DeiT (from JPEG bytes)", "WdsLoader DeiT (PIL transform)",
                "DaliLoader DeiT (CPU operators)"):
        assert f"| {row}" in out, out
    assert "split 'train' -> 32px uint8, batch 4, 0 workers, medians of 1 runs of 2 batches" in out
    bench_main(common + ["--split", "train_12k"])
    out = capsys.readouterr().out
    assert "| WdsLoader DeiT (from JPEG bytes)" in out and "| DaliLoader" not in out
    assert "DaliLoader left out: " in out and "which data.format dali cannot read" in out


# ---------------------------------------------------------------- real runs

def tiny_cvt(num_classes):
    return create_model("cvt_13", num_classes=num_classes, **TINY_CVT)


@pytest.fixture(scope="module")
def runs(hub):
    """One DeepSpeed process each: pretraining on the 22k labels (validating on `validation`), and
    on `train_12k` (validating on `validation_12k`)."""
    root = hub["root"] / "runs"
    codes, out = train(root, str(hub["22k"]), ["name=in22k", "model.num_classes=21841", "schedule.epochs=2"], nproc=1)
    assert codes == [0], out
    codes, out = train(root, str(hub["22k"]), ["name=in12k", "model.num_classes=11821", "schedule.epochs=2",
                                               "data.train_split=train_12k", "data.val_split=validation_12k"], nproc=1)
    assert codes == [0], out
    return {"22k": root / "in22k", "12k": root / "in12k"}


@pytest.mark.slow
def test_training_on_the_22k_labels_and_on_train_12k(runs):
    """48 samples a 22k epoch, 36 a train_12k one (batch 16: 3 and 2 steps); the head's classes
    are the split's; validation counts the 12 samples of `validation` and of `validation_12k`."""
    for run, classes, steps in ((runs["22k"], IN22K, 6), (runs["12k"], IN12K, 4)):
        meta = read_checkpoint(run).metadata
        assert meta["classes"] == classes and meta["num_classes"] == len(classes) and meta["step"] == steps
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["val/count"] for r in records if "val/count" in r][-1] == 12


@pytest.mark.slow
def test_finetune_to_a_hub_1k_folder_copies_head_rows_by_synset(hub, runs, tmp_path):
    argv = ["--config", str(FT_CONFIG), "--pretrained", str(runs["22k"]), "--set", f"data.train={hub['1k']}",
            f"data.val={hub['1k']}", f"out_dir={tmp_path}", "model.num_classes=1000", "schedule.steps=2"]
    codes, out = wait(spawn(1, argv, script="finetune/finetune.py"))
    assert codes == [0], out
    assert "999/1000 head rows copied by synset" in out
    record = json.loads((tmp_path / "tiny_cpu_ft" / "init.json").read_text())
    assert record["missing"] == [TEDDY] and record["copied"] == 999
    # the rows the run started from: each 1k synset's row is the 22k run's row of that synset
    fine_classes = ShardInfo.read(str(hub["1k"])).split("train").synsets
    assert fine_classes == IN1K
    pre = read_checkpoint(runs["22k"]).state_dict
    state, _ = initial_state(tiny_cvt(1000), InitConfig(pretrained=str(runs["22k"])), fine_classes)
    for synset in SHARED + [IN1K[500]]:
        for key in ("head.weight", "head.bias"):
            assert torch.equal(state[key][IN1K.index(synset)], pre[key][IN22K.index(synset)]), synset


@pytest.mark.slow
def test_evaluate_scores_the_hub_splits_as_the_image_folder(hub, runs, tmp_path):
    """The 22k run on `validation` (cls), on `validation_12k` (label_12k, mapped to the 22k rows
    by synset) and on the same JPEGs as an image folder; the 12k run on `validation_12k`."""
    def score(run, data, *extra):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        assert evaluation.main(["--checkpoint", str(run), "--data", str(data), "--precision", "fp32",
                                "--workers", "0", "--batch", "5", "--out", str(out), *extra]) == 0
        return json.loads(out.read_text())

    for run, splits in ((runs["22k"], ("validation", "validation_12k")), (runs["12k"], ("validation_12k",))):
        folder = score(run, hub["val"])
        assert folder["count"] == 12 and folder["top1"] > 0
        for split in splits:
            got = score(run, hub["22k"], "--split", split)
            assert (got["count"], got["top1"], got["top5"]) == (folder["count"], folder["top1"], folder["top5"]), split
            assert got["loss"] == pytest.approx(folder["loss"], abs=1e-4), split
