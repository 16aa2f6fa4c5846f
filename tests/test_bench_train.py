"""The kernel-level training benchmark (cvtkit.bench.train): spec parsing, the table, OOM and error
rows, and a CPU smoke run of main() on a tiny CvT. Speeds are printed, never asserted beyond being
positive."""
import json

import pytest
import torch

from cvtkit.bench import train as bench
from cvtkit.bench.train import BenchConfig, Row
from cvtkit.bench.train_step import compile_model

from helpers import TINY_CVT

TINY = ["--model-args", json.dumps(TINY_CVT), "--num-classes", "10", "--warmup", "1", "--steps", "2"]


def table_rows(out: str) -> dict[str, list[str]]:
    """The markdown table's data rows, by config spec: {spec: [cells after the spec]}."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("config",) and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def test_parse_spec():
    c = BenchConfig.parse("cvt_w24@384:b64:sdpa+cl+rcompile=max-autotune-no-cudagraphs+ckpt")
    assert (c.model, c.res, c.batch, c.attn, c.channels_last, c.ckpt) == ("cvt_w24", 384, 64, "sdpa", True, True)
    assert (c.compile, c.compile_mode, c.dtype) == ("blocks", "max-autotune-no-cudagraphs", None)
    c = BenchConfig.parse("cvt_13@224:b256:ref+compile")
    assert (c.attn, c.compile, c.compile_mode) == ("reference", "model", None)
    assert BenchConfig.parse("ceit_small@224:b8") == BenchConfig("ceit_small", 224, 8, spec="ceit_small@224:b8")
    for bad, match in [("cvt_13@224", "expected MODEL@RES"), ("cvt_13@224:b8:fast", "unknown option 'fast'"),
                       ("nope@224:b8", "unknown model"), ("cvt_13@224:b0", "batch must be"),
                       ("cvt_13@224:b8:zero2", "unknown option 'zero2'.*cvtkit.bench.recipes")]:
        with pytest.raises(ValueError, match=match):
            BenchConfig.parse(bad)


def test_reference_rows_and_ratio():
    def row(spec, ms, status="ok"):
        return Row(BenchConfig.parse(spec), status=status, step_ms=[ms, ms], macs=1e9)
    rows = [row("cvt_13@64:b4:sdpa", 10.0), row("cvt_13@64:b4:ref", 20.0),
            row("cvt_21@64:b4:sdpa", 8.0, "OOM"), row("cvt_21@64:b4:sdpa+cl", 40.0)]
    refs = bench.reference_rows(rows)
    assert refs[0] is rows[1] and refs[1] is rows[1]  # the ref row of the same model and resolution
    assert refs[3] is rows[3]  # no ref row, and the OOM row does not count: the first ok row
    table = table_rows(bench.format_table(rows, peak=100.0, gemm=50.0))
    assert table["cvt_13@64:b4:sdpa"][9] == "2.00" and table["cvt_13@64:b4:ref"][9] == "1.00"
    assert table["cvt_21@64:b4:sdpa"][1] == "OOM"
    # 4 images in 10 ms = 400 images/s; 6 x 1 GMAC x 400 = 2.4 TFLOP/s = 2.4% of 100, 4.8% of 50.
    assert table["cvt_13@64:b4:sdpa"][1:3] == ["400", "10.0"]
    assert table["cvt_13@64:b4:sdpa"][6:9] == ["2.4", "2.4%", "4.8%"]


def test_cpu_smoke_two_configs(capsys):
    rows = bench.main(["--configs", "cvt_13@32:b4:ref", "cvt_13@32:b4:sdpa+cl", *TINY])
    out = capsys.readouterr().out
    assert "device: CPU" in out and "matmul 1024^3 float32" in out
    table = table_rows(out)
    assert list(table) == ["cvt_13@32:b4:ref", "cvt_13@32:b4:sdpa+cl"]
    for spec, cells in table.items():
        batch, images, median, spread, peak, gmacs, tflops, mfu, gemm, ratio, warm = cells
        assert batch == "4" and peak == "-" and mfu == "-"
        assert float(images.replace(",", "")) > 0 and float(median) > 0 and float(spread) >= 0
        assert float(gmacs) > 0 and float(tflops) > 0 and float(gemm.rstrip("%")) > 0 and float(ratio) > 0
    assert table["cvt_13@32:b4:ref"][9] == "1.00"
    assert all(r.status == "ok" and len(r.step_ms) == 2 for r in rows)


def test_failed_config_is_a_row_and_the_run_goes_on(monkeypatch, capsys, tmp_path):
    """An OOM is a finding (the command still succeeds); any other failure is an error row, and the
    command exits 1 (`make gpu-check` fails its part on it)."""
    real = bench.run_config

    def flaky(cfg, args, device):
        if cfg.batch == 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if cfg.batch == 32:
            raise RuntimeError("something else broke")
        return real(cfg, args, device)
    monkeypatch.setattr(bench, "run_config", flaky)
    rows = bench.main(["--configs", "cvt_13@32:b64:sdpa", "cvt_13@32:b32:sdpa", "cvt_13@32:b4:sdpa", *TINY,
                       "--json", str(tmp_path / "rows.json")])
    table = table_rows(capsys.readouterr().out)
    assert [r.status for r in rows][:2] == ["OOM", "error: RuntimeError: something else broke"]
    assert table["cvt_13@32:b64:sdpa"][1] == "OOM"
    assert rows[2].status == "ok" and table["cvt_13@32:b4:sdpa"][9] == "1.00"
    assert bench.exit_code(rows) == 1 and bench.exit_code([rows[0], rows[2]]) == 0
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert [r["status"] for r in saved["rows"]] == [r.status for r in rows] and saved["not_measured"] == []


@pytest.mark.slow
def test_rcompile_compiles_every_block(monkeypatch):
    """Each block's drop-path rate differs, so dynamo makes one graph per block: all must compile
    (here with the recompile limit lowered to 2 and 6 distinct blocks), none left eager."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from cvtkit.models import create_model
    dynamo.reset()
    counters.clear()
    monkeypatch.setattr(dynamo.config, "recompile_limit", 2)
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compile_(self, **{**kw, "backend": "eager"}))
    model = create_model("cvt_13", num_classes=4, **{**TINY_CVT, "depths": (1, 1, 4)}).train()
    compile_model(model, BenchConfig.parse("cvt_13@32:b2:rcompile"))
    model(torch.randn(2, 3, 32, 32))
    assert counters["stats"]["unique_graphs"] == 6
    dynamo.reset()
