"""The source index (`_index/`): listed once and reused, a changed source caught, kill-safe, and
shards byte-identical to the per-image planner it replaced (re-implemented here as the oracle)."""
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from cvtkit.prep import claims, listing, pipeline as prep, plan as plan_module
from cvtkit.prep.convert_image import Resize
from cvtkit.prep.pipeline import INFO_FILE, MANIFEST_DIR, PrepOptions, ShardTask, process_shard, run
from cvtkit.prep.source_index import INDEX_DIR, SourceChanged

import fake_imagenet as fake

REPO = Path(__file__).resolve().parents[1]


def opts(src, out, **kw) -> PrepOptions:
    return PrepOptions(**{"source": str(src), "out": str(out), "workers": 1, "shard_samples": 4,
                          "holdout": 2, **kw})


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def make_source(tmp_path: Path, layout: str) -> Path:
    if layout == "folder22k":
        return fake.make_folder22k(tmp_path / "src")
    tar = fake.make_tar22k(tmp_path / "fall11_whole.tar")
    if layout == "tar22k":
        return tar
    gz = tmp_path / "winter21_whole.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    return gz


def drop_shards(out: Path, count: int) -> None:
    """What a kill leaves: the last shards neither written nor recorded, no _info.json."""
    for shard in sorted(out.glob("*.tar"))[-count:]:
        shard.unlink()
        (out / MANIFEST_DIR / f"{shard.name}.json").unlink()
    (out / INFO_FILE).unlink()


@pytest.fixture
def reads(monkeypatch):
    """Counts of what reads the source's headers: tar member listings (outer and inner), synset
    folder listings, and passes over a compressed stream made for listing."""
    counts = {"tar": 0, "folder": 0, "stream": 0}

    def counting(name, key):
        original = getattr(listing, name)

        def counted(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(listing, name, counted)
    counting("tar_members", "tar")
    counting("_list_folder", "folder")
    counting("iter_stream_tar_of_tars", "stream")
    return counts


@pytest.mark.parametrize("layout", ["tar22k", "folder22k", "targz22k"])
def test_a_restart_reads_no_header_of_the_source(tmp_path, layout, reads, monkeypatch):
    src = make_source(tmp_path, layout)
    first = run(opts(src, tmp_path / "out"), progress=False)
    assert sum(reads.values()) > 0
    if layout == "tar22k":
        assert reads["tar"] == 1 + 3  # the outer tar, then each synset tar once
    drop_shards(tmp_path / "out", 2)
    clean = shard_bytes(tmp_path / "out")
    planned = []
    monkeypatch.setattr(plan_module, "compute_plan", lambda *a: planned.append(1))
    reads.update(tar=0, folder=0, stream=0)
    again = run(opts(src, tmp_path / "out"), progress=False)
    assert reads == {"tar": 0, "folder": 0, "stream": 0} and not planned  # index and plan reused
    assert again == first
    assert set(shard_bytes(tmp_path / "out")) > set(clean)
    monkeypatch.undo()
    fresh = run(opts(src, tmp_path / "fresh"), progress=False)  # listed and planned from scratch
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "fresh") and fresh == first


def rewrite_tar(src: Path, n: int) -> None:
    fake.make_tar22k(src, per_class=12 + n)  # same path, other contents: another size and mtime


def add_image(src: Path, n: int) -> None:
    (src / fake.SYNSETS[n] / f"{fake.SYNSETS[n]}_new.JPEG").write_bytes(fake.jpeg(random.Random(n)))


@pytest.mark.parametrize("layout,change", [("tar22k", rewrite_tar), ("folder22k", add_image)])
def test_a_changed_source_is_listed_again_or_refused(tmp_path, layout, change, capsys):
    src = make_source(tmp_path, layout)
    out = tmp_path / "out"
    assert run(opts(src, out), progress=False, task_index=98, num_tasks=99) is None  # listed, no shard
    assert not list(out.glob("*.tar"))
    change(src, 1)
    run(opts(src, out), progress=False)
    note = capsys.readouterr().err
    assert "changed since it was listed" in note and "listing it again" in note
    run(opts(src, tmp_path / "clean"), progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert len(list((out / INDEX_DIR).iterdir())) == 1  # the old listing is gone
    change(src, 2)
    with pytest.raises(SourceChanged, match=r"changed since it was listed \(.*\); the shards in .* come "
                                            r"from the old listing: use another --out"):
        run(opts(src, out), progress=False)
    proc = subprocess.run([sys.executable, str(REPO / "data_prep" / "make_shards.py"), "--source", str(src),
                           "--out", str(out), "--workers", "1", "--shard-samples", "4", "--holdout", "2",
                           "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "changed since it was listed" in proc.stderr


# make_shards.py, SIGKILLed by itself at a chosen point of the index build.
KILLER = """
import os, runpy, signal, socket, sys
from cvtkit.prep import plan, source_index
point, calls = sys.argv[1], [0]

def kill_at(original, call, half):
    def wrapper(path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            if half:  # a temporary file half written, as save_npz / _write_json name it
                tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
                tmp.write_bytes(b"PK half of it")
            else:
                original(path, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, *args, **kwargs)
    return wrapper

if point == "units.json half written":
    source_index._write_json = kill_at(source_index._write_json, 1, True)
else:  # save_npz: parts 0, 1, 2, then the plan
    call, half = {"part half written": (2, True), "first part stored": (1, False),
                  "plan half written": (4, True)}[point]
    source_index.save_npz = plan.save_npz = kill_at(source_index.save_npz, call, half)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("point", ["units.json half written", "part half written", "first part stored",
                                   "plan half written"])
def test_a_killed_index_build_leaves_nothing_a_rerun_trusts(tmp_path, point, reads):
    src = fake.make_tar22k(tmp_path / "fall11_whole.tar")  # 3 synset tars: 3 parts
    out = tmp_path / "out"
    args = ["--source", str(src), "--out", str(out), "--workers", "1", "--shard-samples", "4",
            "--holdout", "2", "--quiet"]
    make_shards = str(REPO / "data_prep" / "make_shards.py")
    proc = subprocess.run([sys.executable, "-c", KILLER, point, make_shards, *args], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    folder = next((out / INDEX_DIR).iterdir())
    stored = sorted(p.name for p in folder.glob("part-*.npz"))
    assert stored == {"units.json half written": [], "part half written": ["part-00000.npz"],
                      "first part stored": ["part-00000.npz"],
                      "plan half written": ["part-00000.npz", "part-00001.npz", "part-00002.npz"]}[point]
    assert list(folder.glob(".*tmp-*")) or list(folder.glob("*.claim"))  # what the kill left behind
    assert not list(out.glob("*.tar")) and not (out / INFO_FILE).exists()
    for part in stored:  # what has a final name is whole
        with np.load(folder / part, allow_pickle=False) as f:
            assert json.loads(f["meta"].tobytes())["name"] == part[:-4]
    info = run(opts(src, out), progress=False)
    assert reads["tar"] == (point.startswith("units")) + 3 - len(stored)  # only what was missing
    assert info == run(opts(src, tmp_path / "clean"), progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert not list(out.rglob(".*tmp*")) and not list(out.rglob("*.claim"))


# The per-image listing and planner that the index replaced, as they were: the oracle.
def legacy_items(src: Path, layout: str) -> list[tuple[str, str, str, bytes]]:
    """(synset, key, filename, bytes) of every image, listed with tarfile or os.scandir."""
    items = []
    if layout == "tar22k":
        with tarfile.open(src) as outer:
            for member in outer:
                with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                    for m in inner:
                        p = PurePosixPath(m.name)
                        if m.isfile() and not p.is_absolute() and ".." not in p.parts:
                            items.append((member.name[:-4], p.stem.replace(".", "_"),
                                          f"{member.name}:{m.name}", inner.extractfile(m).read()))
        return items
    for d in sorted(src.iterdir()):
        for e in os.scandir(d):
            items.append((d.name, Path(e.name).stem.replace(".", "_"), f"{d.name}/{e.name}",
                          Path(e.path).read_bytes()))
    return items


def legacy_plan(items, o: PrepOptions) -> tuple[list[str], list[tuple[str, int, list]]]:
    """Classes, and (split, index, images) of every shard, by the per-image algorithm."""
    import hashlib
    wanted = set(o.classes)
    train = [i for i in items if not wanted or i[0] in wanted]
    held = set()
    if o.holdout > 0:
        by_class: dict[str, list] = {}
        for item in train:
            by_class.setdefault(item[0], []).append(item)
        for members in by_class.values():
            ranked = sorted(members, key=lambda i: hashlib.sha256(f"{o.seed}:{i[1]}".encode()).hexdigest())
            held.update(i[1] for i in ranked[:min(o.holdout, len(members) // 2)])
    shards = []
    for name in ("train", "validation"):
        members = sorted((i for i in train if (i[1] in held) == (name == "validation")), key=lambda i: i[1])
        random.Random(f"{o.seed}:{name}").shuffle(members)
        current, size = [], 0
        for item in members:
            if len(current) >= o.shard_samples if o.shard_bytes <= 0 else current and size + len(item[3]) > o.shard_bytes:
                shards.append((name, current))
                current, size = [], 0
            current.append(item)
            size += len(item[3])
        shards += [(name, current)] if current else []
    numbered = [(name, sum(1 for n, _ in shards[:k] if n == name), images) for k, (name, images) in enumerate(shards)]
    return sorted({i[0] for i in train}), numbered


@pytest.mark.parametrize("layout,options", [
    ("tar22k", dict(holdout=3, seed=4)),
    ("folder22k", dict(shard_bytes=6000, holdout=2)),
    ("folder22k", dict(classes=("n01443537", "n02084071"), holdout=0, shard_samples=5, resize="shorter:30")),
])
def test_shards_equal_the_per_image_planners(tmp_path, layout, options):
    src = make_source(tmp_path, layout)
    o = opts(src, tmp_path / "out", **options)
    run(o, progress=False)
    classes, planned = legacy_plan(legacy_items(src, layout), o)
    expected, blobs = tmp_path / "legacy", tmp_path / "blobs"
    expected.mkdir()
    blobs.mkdir()
    for split, k, images in planned:
        items = []
        for synset, key, filename, data in images:
            (blobs / key).write_bytes(data)  # the bytes as the old listing read them
            items.append(prep.Item(synset, key, filename, str(blobs / key), len(data)))
        process_shard(ShardTask(split, k, expected / prep.shard_name(o.prefix, split, k), items,
                                [classes.index(i.synset) for i in items],
                                Resize.parse(o.resize) if o.resize else None, o.quality, o.decode_check))
    assert shard_bytes(tmp_path / "out") == shard_bytes(expected)


def test_listing_in_parallel_gives_the_same_index_and_shards(tmp_path):
    src = fake.make_tar22k(tmp_path / "fall11_whole.tar", synsets=fake.SYNSETS)
    one = run(opts(src, tmp_path / "one"), progress=False)
    two = run(opts(src, tmp_path / "two", workers=2), progress=False)
    assert one == two and shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    [a], [b] = (list((tmp_path / d / INDEX_DIR).iterdir()) for d in ("one", "two"))
    for part in sorted(a.glob("part-*.npz")):
        with np.load(part) as x, np.load(b / part.name) as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files)


def test_listing_shows_progress_with_rate_and_eta(tmp_path, capsys):
    src = fake.make_tar22k(tmp_path / "fall11_whole.tar")
    run(opts(src, tmp_path / "quiet"), progress=False)
    assert capsys.readouterr() == ("", "")
    run(opts(src, tmp_path / "out"), progress=True)
    err = capsys.readouterr().err
    bar = [line for line in err.replace("\r", "\n").splitlines() if "listing fall11_whole.tar: images" in line][-1]
    assert "100%" in bar and "B/s" in bar and "<" in bar and "images=44" in bar  # rate, elapsed<ETA, count (bad files too)


def test_a_claim_is_taken_over_only_from_a_gone_owner(tmp_path, monkeypatch):
    mine, other = claims.Claims(tmp_path), claims.Claims(tmp_path)
    assert mine.take("part-00000") and not other.take("part-00000")  # held by a live process
    dead = subprocess.Popen(["true"])
    dead.wait()
    claim = tmp_path / "part-00001.claim"
    claim.write_text(json.dumps({**claims.owner(), "pid": dead.pid, "job": None}))
    assert other.take("part-00001")  # its owner died on this host
    claim = tmp_path / "part-00002.claim"
    claim.write_text(json.dumps({**claims.owner(), "host": "elsewhere", "job": None}))
    monkeypatch.setattr(claims, "STALE_AFTER_S", 0.0)
    assert not other.take("part-00002")  # first sight of a heartbeat: wait and see
    assert other.take("part-00002")  # the heartbeat did not move
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    (tmp_path / "part-00003.claim").write_text(json.dumps({**claims.owner(), "host": "elsewhere", "pid": 1}))
    assert claims.Claims(tmp_path).take("part-00003")  # an earlier run of this array task


def test_scale_benchmark_prints_the_projection(capsys):
    from cvtkit.bench.shards import scale_table
    rows = scale_table(12, [1, 2, 3], workers=1, isolate=False)
    out = capsys.readouterr().out
    assert [r["images"] for r in rows] == [12, 24, 36]
    assert "14,197,122 (linear fit)" in out and "restart starts writing after" in out
    assert "tarfile, one Item per image (before)" in out and "index, 1 worker" in out
