"""data_prep/make_shards.py on real JPEG trees in every source layout, with bad files and kills."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm.data
from PIL import Image

from cvtkit.prep.convert_image import BadImage, Resize, prepare_image
from cvtkit.prep.pipeline import INFO_FILE, MANIFEST_DIR, PrepOptions, run
from cvtkit.prep.verify import verify
from cvtkit.prep.sources import SourceError

import fake_imagenet as fake

REPO = Path(__file__).resolve().parents[1]
MAKE_SHARDS = [sys.executable, str(REPO / "data_prep" / "make_shards.py")]


def opts(**kw) -> PrepOptions:
    """One worker unless a test asks for more: each spawned worker costs a process start."""
    return PrepOptions(**{"workers": 1, **kw})


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def read_samples(out: Path, split="train"):
    """All samples through timm's own webdataset reader."""
    ds = timm.data.create_dataset("wds/imagenet", root=str(out), split=split, is_training=False,
                                  batch_size=1)
    return [(img, target) for img, target in ds]


@pytest.mark.parametrize("decode_check", [False, True])
@pytest.mark.parametrize("kind", list(fake.BAD_FILES))
def test_bad_images_are_skipped_or_converted(kind, decode_check):
    import random
    make, outcome = fake.BAD_FILES[kind]
    raw = make(random.Random(0))
    if outcome == "skip":
        with pytest.raises(BadImage):
            prepare_image(raw, decode_check=decode_check)
    else:
        img = prepare_image(raw, decode_check=decode_check)
        assert img.note and Image.open(__import__("io").BytesIO(img.jpeg)).mode == "RGB"
        assert Image.open(__import__("io").BytesIO(img.jpeg)).format == "JPEG"


def test_valid_jpeg_is_copied_untouched_and_resize_shrinks():
    import io
    import random
    raw = fake.jpeg(random.Random(0), size=(120, 80))
    img = prepare_image(raw)
    assert img.jpeg is raw and (img.width, img.height) == (120, 80) and not img.note
    small = prepare_image(raw, Resize.parse("shorter:40"))
    assert (small.width, small.height) == (60, 40) and Image.open(io.BytesIO(small.jpeg)).size == (60, 40)
    assert prepare_image(raw, Resize.parse("longer:200")).jpeg is raw  # never enlarge
    with pytest.raises(ValueError, match="expected shorter:N or longer:N"):
        Resize.parse("short:40")


def test_folder22k_counts_labels_holdout_and_timm_reads(tmp_path):
    src = fake.make_folder22k(tmp_path / "src")
    info = run(opts(source=str(src), out=str(tmp_path / "out"), shard_samples=5, workers=2,
                           holdout=3, prefix="imagenet22k"), progress=False)
    classes = [c["synset"] for c in info["classes"]]
    assert classes == sorted(fake.SYNSETS[:3]) and info["num_classes"] == 3
    assert info["classes"][0]["name"] == "tench, Tinca tinca"
    rep = info["report"]
    assert rep["num_skipped"] == 3 and rep["num_converted"] == 5
    assert {r["file"].split("_")[-1] for r in rep["skipped"]} == {"empty.JPEG", "text.JPEG", "truncated.JPEG"}
    train, val = info["splits"]["train"], info["splits"]["validation"]
    assert train["num_samples"] + val["num_samples"] == 12 * 3 + 5  # every good or converted image
    assert val["num_samples"] <= 9 and all(n.startswith("imagenet22k-train-") for n in train["filenames"])
    assert train["filenames"][0] == "imagenet22k-train-000000.tar"
    # The 1k map: tench and goldfish found, teddy bear (not in fall11) has no 22k row.
    assert info["synset_map_1k"]["n01440764"] == 0 and info["synset_map_1k"]["n04399382"] is None
    assert verify(tmp_path / "out") == []
    samples = read_samples(tmp_path / "out")
    assert len(samples) == train["num_samples"]
    assert {t for _, t in samples} == {0, 1, 2}
    assert all(img.mode == "RGB" for img, _ in samples)
    # Shuffled across shards: the first shard already mixes classes.
    import tarfile
    with tarfile.open(tmp_path / "out" / train["filenames"][0]) as tar:
        labels = {int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")}
        records = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
        names = [m.name for m in tar]
    assert len(labels) > 1
    assert all(n.count(".") == 1 for n in names)
    assert set(records[0]) >= {"label", "synset", "filename", "width", "height"}


def test_output_is_deterministic_whatever_the_workers(tmp_path):
    src = fake.make_folder22k(tmp_path / "src")
    a = run(opts(source=str(src), out=str(tmp_path / "a"), shard_samples=4, workers=1), progress=False)
    b = run(opts(source=str(src), out=str(tmp_path / "b"), shard_samples=4, workers=3), progress=False)
    assert a == b
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    c = run(opts(source=str(src), out=str(tmp_path / "c"), shard_samples=4, seed=1), progress=False)
    assert c["splits"]["train"]["shard_sha256"] != a["splits"]["train"]["shard_sha256"]


def test_tar_of_synset_tars_is_read_in_place(tmp_path):
    tar = fake.make_tar22k(tmp_path / "fall11_whole.tar")
    source = fake.scan(tar)
    assert source.layout == "tar22k"
    assert sorted(r for _, r in source.rejected) == ["'..' in tar member path", "absolute path in tar member"]
    info = run(opts(source=str(tar), out=str(tmp_path / "out"), shard_samples=6, holdout=2),
               progress=False)
    assert info["report"]["num_rejected"] == 2 and info["report"]["num_skipped"] == 3
    total = sum(s["num_samples"] for s in info["splits"].values())
    assert total == 12 * 3 + 5
    assert verify(tmp_path / "out") == []
    assert len(read_samples(tmp_path / "out", "validation")) == info["splits"]["validation"]["num_samples"]


def test_compressed_tar_is_streamed_to_the_same_shards(tmp_path):
    import gzip
    tar = fake.make_tar22k(tmp_path / "winter21_whole.tar")
    gz = tmp_path / "winter21_whole.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    assert fake.scan(gz).layout == "targz22k"
    plain = run(opts(source=str(tar), out=str(tmp_path / "plain"), shard_samples=5, holdout=2), progress=False)
    streamed = run(opts(source=str(gz), out=str(tmp_path / "gz"), shard_samples=5, holdout=2), progress=False)
    assert shard_bytes(tmp_path / "gz") == shard_bytes(tmp_path / "plain")
    assert streamed["splits"] == plain["splits"] and streamed["report"] == plain["report"]
    assert not (tmp_path / "gz" / "_spool").exists()
    assert verify(tmp_path / "gz") == []


@pytest.mark.parametrize("flat_val", ["csv", "list", None])
def test_imagenet1k_layouts(tmp_path, flat_val):
    src = fake.make_imagenet1k(tmp_path / "in1k", flat_val=flat_val)
    info = run(opts(source=str(src), out=str(tmp_path / "out"), prefix="imagenet1k",
                           shard_samples=8), progress=False)
    assert info["splits"]["train"]["num_samples"] == 40
    assert info["splits"]["validation"]["num_samples"] == 12
    assert "synset_map_1k" not in info
    val = read_samples(tmp_path / "out", "validation")
    assert sorted(t for _, t in val) == sorted([0, 1, 2, 3] * 3)


def test_class_subset(tmp_path):
    src = fake.make_imagenet1k(tmp_path / "in1k")
    info = run(opts(source=str(src), out=str(tmp_path / "out"), classes=("n01443537", "n04399382")),
               progress=False)
    assert [c["synset"] for c in info["classes"]] == ["n01443537", "n04399382"]
    assert info["splits"]["validation"]["num_samples"] == 6
    with pytest.raises(SourceError, match="classes not in the source: n09999999"):
        run(opts(source=str(src), out=str(tmp_path / "o2"), classes=("n09999999",)), progress=False)


def test_kill_and_rerun_gives_identical_output(tmp_path):
    """kill -9 of every process of the job (tests/fault_prep.py kills its process group from
    inside, so the kill lands while it runs) three times: inside a shard's tar write, and between
    a shard's rename and its manifest entry; the rerun completes it byte-identical to a clean run."""
    import random
    src = fake.make_folder22k(tmp_path / "src", per_class=30)
    args = ["--source", str(src), "--shard-samples", "2", "--quiet"]
    subprocess.run(MAKE_SHARDS + args + ["--workers", "1", "--out", str(tmp_path / "clean")], check=True)
    clean = json.loads((tmp_path / "clean" / INFO_FILE).read_text())
    names = [name for split in clean["splits"].values() for name in split["filenames"]]
    args += ["--workers", "2"]  # the output does not depend on the workers either
    out = tmp_path / "killed"
    rng = random.Random(0)
    for moment in ("writing", "recording", "writing"):
        unfinished = [n for n in names if not (out / MANIFEST_DIR / f"{n}.json").exists()]
        shard = rng.choice(unfinished[:6])
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fault_prep.py"), *args, "--out", str(out)],
                                start_new_session=True, env={**os.environ, "CVTKIT_KILL_PREP": f"{shard}:{moment}"})
        assert proc.wait() == -signal.SIGKILL
        assert not (out / INFO_FILE).exists()  # written last
        if moment == "writing":  # killed inside the shard's write: its temporary tar is left
            assert list(out.glob(f".{shard}.tmp*")) and not (out / MANIFEST_DIR / f"{shard}.json").exists()
        else:  # renamed into place, not recorded: the rerun must redo it
            assert (out / shard).exists() and not (out / MANIFEST_DIR / f"{shard}.json").exists()
    subprocess.run(MAKE_SHARDS + args + ["--out", str(out)], check=True)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert json.loads((out / INFO_FILE).read_text()) == clean
    assert not [p for p in out.rglob(".*tmp*")]


def test_changed_options_are_refused(tmp_path):
    src = fake.make_imagenet1k(tmp_path / "in1k")
    run(opts(source=str(src), out=str(tmp_path / "out")), progress=False)
    with pytest.raises(SourceError, match="holds shards made with other options \\(seed\\)"):
        run(opts(source=str(src), out=str(tmp_path / "out"), seed=5), progress=False)
    run(opts(source=str(src), out=str(tmp_path / "out"), workers=1), progress=False)  # fine


@pytest.mark.parametrize("name,content,message", [
    ("missing", None, "source not found"),
    ("empty", "dir", "unrecognised layout"),
    ("x.tar.gz", b"\x1f\x8b", "not a tar file nor a folder"),
    ("notes.txt", b"hi", "not a tar file nor a folder"),
])
def test_bad_sources_fail_with_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    proc = subprocess.run(MAKE_SHARDS + ["--source", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1 and str(path) in proc.stderr
    assert not (tmp_path / "out").exists()


def test_flat_val_without_labels_is_an_error(tmp_path):
    src = fake.make_imagenet1k(tmp_path / "in1k", flat_val="csv")
    (src / "LOC_val_solution.csv").unlink()
    with pytest.raises(SourceError, match="flat validation images need a labels file"):
        fake.scan(src)


def test_verify_shards_finds_damage(tmp_path):
    src = fake.make_imagenet1k(tmp_path / "in1k")
    info = run(opts(source=str(src), out=str(tmp_path / "out"), shard_samples=8), progress=False)
    verify_cli = [sys.executable, str(REPO / "data_prep" / "verify_shards.py"), str(tmp_path / "out")]
    assert subprocess.run(verify_cli, capture_output=True).returncode == 0
    shard = tmp_path / "out" / info["splits"]["train"]["filenames"][1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.remove(tmp_path / "out" / info["splits"]["validation"]["filenames"][0])
    proc = subprocess.run(verify_cli, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "sha256 differs" in proc.stderr and "missing" in proc.stderr


def test_resize_mode_records_original_size(tmp_path):
    """shorter:24 shrinks every image whose shorter side is longer (aspect kept, to a pixel) and
    records the source's size in the sample's json; the others are kept as they are, with no
    original size recorded."""
    import io
    import tarfile
    src = fake.make_imagenet1k(tmp_path / "in1k")
    run(opts(source=str(src), out=str(tmp_path / "out"), resize="shorter:24", quality=80),
        progress=False)
    source_sizes = {p.name: Image.open(p).size for p in src.rglob("*.JPEG")}
    shrunk = kept = 0
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in (n for n in members if n.endswith(".json")):
            record = json.loads(members[name])
            size = Image.open(io.BytesIO(members[name.removesuffix(".json") + ".jpg"])).size
            w, h = source_sizes[Path(record["filename"]).name]
            assert (record["width"], record["height"]) == size, record
            if min(w, h) > 24:
                assert (record["orig_width"], record["orig_height"]) == (w, h), record
                assert min(size) == 24 and abs(size[0] / size[1] - w / h) <= 1 / min(size), record
                shrunk += 1
            else:
                assert "orig_width" not in record and "orig_height" not in record and size == (w, h), record
                kept += 1
    assert shrunk > 0 and kept > 0 and shrunk + kept == len(source_sizes)


def test_make_ffcv_writes_betons_that_ffcv_reads(tmp_path):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    from cvtkit.prep.beton import ShardIndex

    src = fake.make_imagenet1k(tmp_path / "in1k")
    run(opts(source=str(src), out=str(tmp_path / "wds"), shard_samples=16), progress=False)
    cli = [sys.executable, str(REPO / "data_prep" / "make_ffcv.py"), "--shards", str(tmp_path / "wds"),
           "--out", str(tmp_path / "ffcv"), "--max-resolution", "64", "--workers", "1"]
    proc = subprocess.run(cli, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "train.beton: 40 samples" in proc.stdout and "validation.beton: 12 samples" in proc.stdout
    for split, n in (("train", 40), ("validation", 12)):
        loader = Loader(str(tmp_path / "ffcv" / f"{split}.beton"), batch_size=8, num_workers=1,
                        order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [CenterCropRGBImageDecoder((24, 24), 1.0), ToTensor()],
                                   "label": [IntDecoder(), ToTensor()]})
        images, labels = [], []
        for x, y in loader:
            images.append(x)
            labels += y.flatten().tolist()
        assert labels == [s.label for s in ShardIndex(tmp_path / "wds", split).samples]
        assert sum(len(x) for x in images) == n and images[0].shape[1:] == (24, 24, 3)
    bad = subprocess.run(cli[:3] + [str(tmp_path / "nowhere")] + cli[4:], capture_output=True, text=True)
    assert bad.returncode == 2 and "nowhere: no such shard folder" in bad.stderr


def test_truncated_compressed_tar_is_a_clear_error(tmp_path):
    import gzip
    tar = fake.make_tar22k(tmp_path / "w.tar")
    data = gzip.compress(tar.read_bytes())
    (tmp_path / "w.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SourceError, match="w.tar.gz: damaged tar"):
        fake.scan(tmp_path / "w.tar.gz")


def test_slurm_array_slices_write_disjoint_shards(tmp_path):
    """slurm/make_shards.sh run as the tasks of a 3-task array (1-based, as `--array=1-3` gives).

    The array's environment is set by hand here: the real-Slurm run of these scripts belongs
    to the local cluster tests."""
    src = fake.make_folder22k(tmp_path / "src", per_class=8)
    common = ["--source", str(src), "--shard-samples", "3", "--holdout", "2"]
    subprocess.run(MAKE_SHARDS + common + ["--out", str(tmp_path / "whole"), "--quiet", "--workers", "1"],
                   check=True)
    out = tmp_path / "array"
    env = dict(os.environ, PYTHON=sys.executable, CVTKIT_REPO=str(REPO), SLURM_ARRAY_TASK_MIN="1",
               SLURM_ARRAY_TASK_COUNT="3", SLURM_CPUS_PER_TASK="1")
    written = []
    for task in (3, 1, 2):
        before = set(shard_bytes(out)) if out.exists() else set()
        subprocess.run(["bash", str(REPO / "slurm" / "make_shards.sh"), *common, "--out", str(out)],
                       env={**env, "SLURM_ARRAY_TASK_ID": str(task)}, check=True)
        written.append(set(shard_bytes(out)) - before)
        assert (out / INFO_FILE).exists() == (task == 2)  # the last task writes it
    assert all(written) and not (written[0] & written[1]) and not (written[1] & written[2])
    assert_listed_once(out, parts=3)  # the first task listed it all; the others reused its index
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert json.loads((out / INFO_FILE).read_text()) == json.loads((tmp_path / "whole" / INFO_FILE).read_text())
    proc = subprocess.run(["bash", str(REPO / "slurm" / "make_shards.sh"), *common, "--out", str(out)],
                          env={k: v for k, v in env.items() if k != "SLURM_ARRAY_TASK_ID"},
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "run this through sbatch" in proc.stderr


def test_shard_benchmark_prints_its_table(capsys):
    from cvtkit.bench.shards import main as bench_main
    bench_main(["--images", "24", "--repeats", "1", "--workers", "1"])
    out = capsys.readouterr().out
    assert "tar | cat" in out and "make_shards copy" in out and "make_shards resize shorter:256" in out
    assert "24 images" in out


def assert_listed_once(out: Path, parts: int) -> list[list[str]]:
    """Every part of the source index (and the list of synset tars) was listed by one task only:
    `_index/*/listed.log` has one line per stored part."""
    [folder] = list((out / "_index").iterdir())
    lines = [line.split() for line in (folder / "listed.log").read_text().splitlines()]
    names = [line[0] for line in lines]
    assert set(names) - {"units"} == {f"part-{p:05d}" for p in range(parts)}, names
    assert len(names) == len(set(names)), names  # none twice
    return lines


@pytest.mark.slow
def test_make_shards_as_a_real_slurm_array(tmp_path, slurm_cluster):
    src = fake.make_tar22k(tmp_path / "fall11_whole.tar", per_class=8)
    common = ["--source", str(src), "--shard-samples", "3", "--holdout", "2"]
    subprocess.run(MAKE_SHARDS + common + ["--out", str(tmp_path / "whole"), "--quiet", "--workers", "1"],
                   check=True)
    proc = subprocess.run(["sbatch", "--wait", "--array=0-2", "--cpus-per-task=1", "--mem=1G",
                           f"--output={tmp_path}/task-%a.log", "slurm/make_shards.sh", *common,
                           "--out", str(tmp_path / "array")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable))
    logs = "".join(p.read_text() for p in tmp_path.glob("task-*.log"))
    assert proc.returncode == 0, proc.stderr + logs
    assert len(list(tmp_path.glob("task-*.log"))) == 3
    assert shard_bytes(tmp_path / "array") == shard_bytes(tmp_path / "whole")
    assert json.loads((tmp_path / "array" / INFO_FILE).read_text()) == \
        json.loads((tmp_path / "whole" / INFO_FILE).read_text())
    lines = assert_listed_once(tmp_path / "array", parts=3)  # the tar's headers were read once
    assert [line[0] for line in lines].count("units") == 1
    assert {line[4].rsplit("_", 1)[1] for line in lines} <= {"0", "1", "2"}  # by the array's tasks


def test_shards_cut_by_bytes(tmp_path):
    src = fake.make_imagenet1k(tmp_path / "in1k")
    limit = 3000
    info = run(opts(source=str(src), out=str(tmp_path / "out"), shard_bytes=limit), progress=False)
    source_sizes = {i.key: i.size for i in fake.scan(src).splits["train"]}
    import tarfile
    for name in info["splits"]["train"]["filenames"]:
        with tarfile.open(tmp_path / "out" / name) as tar:
            keys = [m.name[:-4] for m in tar if m.name.endswith(".jpg")]
        assert sum(source_sizes[k] for k in keys) <= limit or len(keys) == 1
    assert len(info["splits"]["train"]["filenames"]) > 3


def test_unwritable_output_is_a_one_line_error(tmp_path):
    src = fake.make_imagenet1k(tmp_path / "in1k")
    (tmp_path / "file").write_text("not a folder")
    proc = subprocess.run(MAKE_SHARDS + ["--source", str(src), "--out", str(tmp_path / "file" / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert str(tmp_path / "file") in proc.stderr


def test_cli_class_file_resize_and_bad_option(tmp_path):
    src = fake.make_imagenet1k(tmp_path / "in1k")
    (tmp_path / "subset.txt").write_text("n01443537 goldfish\n\nn04399382 teddy\n")
    base = MAKE_SHARDS + ["--source", str(src), "--workers", "1", "--quiet"]
    subprocess.run(base + ["--out", str(tmp_path / "out"), "--classes", str(tmp_path / "subset.txt"),
                           "--resize", "shorter:20"], check=True)
    info = json.loads((tmp_path / "out" / INFO_FILE).read_text())
    assert [c["synset"] for c in info["classes"]] == ["n01443537", "n04399382"]
    assert info["options"]["resize"] == "shorter:20"
    assert all(min(img.size) <= 20 for img, _ in read_samples(tmp_path / "out"))
    proc = subprocess.run(base + ["--out", str(tmp_path / "o2"), "--resize", "wide:3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "resize 'wide:3': expected shorter:N or longer:N" in proc.stderr
