"""The loader benchmark where a loader's package is missing (DALI and ffcv do not travel to a bare
GPU machine): its row says "not installed here" and is never a measurement; the others run."""
from cvtkit.bench import loaders as bench

from helpers import make_tiny_shards


def test_a_loader_whose_package_is_missing_is_a_row_that_says_so(tmp_path, monkeypatch, capsys):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "wds").symlink_to(make_tiny_shards(tmp_path / "data"))
    monkeypatch.setattr(bench, "installed", lambda module: module not in ("nvidia.dali", "ffcv"))
    rows = bench.loaders(tmp_path / "work", tmp_path / "src", size=32, batch=4, workers=0)
    missing = ["FfcvLoader RRC + flip", "DaliLoader DeiT (CPU operators)", "DaliLoader DeiT (mixed, GPU)"]
    assert [rows[name][1] for name in missing] == [None, None, None]
    wds = "WdsLoader DeiT (from JPEG bytes)"
    chosen = {name: rows[name] for name in ["ImageFolder + timm DeiT", wds, *missing[1:]]}
    chosen["ImageFolder + timm DeiT"] = (bench.DEIT, rows[wds][1])  # the baseline column, without a source tree
    results = bench.measure(chosen, repeats=1)
    assert [(name, rate is None) for name, _, rate, _ in results] == [
        ("ImageFolder + timm DeiT", False), (wds, False), (missing[1], True), (missing[2], True)]
    bench.print_table(results, "64 images", size=32, batch=4, workers=0, repeats=1)
    table = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert "not installed here (not measured)" in table[missing[1]] and "not installed here" in table[missing[2]]
    assert "not installed" not in table[wds] and table[wds].split("|")[3].strip().isdigit()
