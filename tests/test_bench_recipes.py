"""The trainer-path benchmark (cvtkit.bench.recipes): the real Trainer from a recipe on synthetic
batches, one process; its rows are the Trainer's own figures. Speeds are printed, never asserted
beyond coming from the run."""
import json

import pytest
import yaml

from cvtkit.bench import recipes

from helpers import metrics


def table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "row":
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_rows_are_the_trainers_own_figures(tmp_path, capsys):
    sdpa, ref = "pretrain/tiny_cpu", "pretrain/tiny_cpu model.attn_impl=reference"
    code = recipes.main(["--rows", sdpa, ref, "--steps", "2", "--keep", str(tmp_path / "runs"),
                         "--json", str(tmp_path / "rows.json")])
    assert code == 0
    table = table_rows(capsys.readouterr().out)
    assert list(table) == [sdpa, ref]
    figures = {}
    for spec, folder in ((sdpa, "row0"), (ref, "row1")):
        run = tmp_path / "runs" / folder / "bench"
        logged = [m for m in metrics(run) if "perf/images_per_s" in m]
        assert [m["step"] for m in logged] == [2, 4]  # a warm-up window, then the measured one
        last = figures[spec] = logged[-1]
        model, micro, images, step_s, mfu, peak, wait, warm, _ = table[spec]
        assert model == "cvt_13 @ 32" and micro == "16 x 1" and mfu == "-"  # no MFU without a GPU peak
        assert images == f"{last['perf/images_per_s']:,.1f}" and step_s == f"{last['perf/step_s']:.3f}"
        assert peak == f"{last['mem/peak_gib']:.2f}" and warm == f"{logged[0]['perf/step_s']:.3f}"
        assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
        assert json.loads((run / "starts.jsonl").read_text().splitlines()[-1])["device"] == "cpu"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["data"]["val"] is None and config["schedule"]["steps"] == 4
    assert table[ref][-1] == "1.00"
    ratio = figures[sdpa]["perf/images_per_s"] / figures[ref]["perf/images_per_s"]
    assert table[sdpa][-1] == f"{ratio:.2f}"
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["spec"], r["status"]) for r in rows] == [(sdpa, "ok"), (ref, "ok")]
    assert rows[0]["perf/images_per_s"] == figures[sdpa]["perf/images_per_s"]


def test_a_failing_row_is_an_error_and_the_command_fails(tmp_path, capsys):
    code = recipes.main(["--rows", "pretrain/tiny_cpu optim.lrr=1", "--steps", "1",
                         "--json", str(tmp_path / "rows.json")])
    assert code == 1
    status = table_rows(capsys.readouterr().out)["pretrain/tiny_cpu optim.lrr=1"][2]
    assert status.startswith("error: --set: optim.lrr: unknown key"), status  # the child's one line
    assert json.loads((tmp_path / "rows.json").read_text())["rows"][0]["status"] == status


def test_out_of_memory_is_a_finding_not_an_error():
    assert recipes.failure("...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") == "OOM"
    assert recipes.failure("Traceback ...\nRuntimeError: boom\n") == "error: RuntimeError: boom"
