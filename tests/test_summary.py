"""MAC counts against the official code's (docs/models.md#parameters-and-macs): CvT with the
attention matmuls, CeiT conv + linear only."""
import pytest

from cvtkit.models.summary import main, model_macs

# (model, res, the official code's figure in GMACs, which count)
OFFICIAL_MACS = [
    ("cvt_13", 224, 4.580, "total"),  # official ptflops + compute_macs hook
    ("cvt_21", 224, 7.199, "total"),
    ("cvt_13", 384, 16.333, "total"),
    ("cvt_w24", 384, 194.554, "total"),
    ("ceit_tiny", 224, 1.216, "conv_linear"),
    ("ceit_small", 224, 4.402, "conv_linear"),
    ("ceit_base", 224, 17.03, "conv_linear"),
    ("ceit_tiny_384", 384, 3.569, "conv_linear"),
    ("ceit_small_384", 384, 12.912, "conv_linear"),
]


@pytest.mark.parametrize("name,res,expected,kind", OFFICIAL_MACS)
def test_macs_within_one_percent_of_spec(name, res, expected, kind):
    macs = model_macs(name, res)
    assert getattr(macs, kind) / 1e9 == pytest.approx(expected, rel=0.01)


def test_cvt_analytic_count_is_exact():
    # The analytic count (conv + linear + attention matmuls, docs/models.md#parameters-and-macs), to
    # the printed precision.
    assert model_macs("cvt_13", 224).total / 1e9 == pytest.approx(4.566, abs=5e-4)
    assert model_macs("cvt_w24", 384).total / 1e9 == pytest.approx(194.222, abs=5e-4)


def test_summary_cli_prints_the_zoo(capsys):
    main(["--models", "cvt_13", "--res", "224", "384"])
    out = capsys.readouterr().out
    assert "cvt_13" in out and "19,997,480" in out and "4.566" in out and "16.269" in out
    with pytest.raises(SystemExit):
        main(["--models", "nope*"])
