"""Issue 16 item 1: an image whose decoded pixels are NaN/inf is reported (exit 2, one line), never saved as black."""
import torch
from typer.testing import CliRunner

from lcmtool.cli import app
from lcmtool.models import pipeline


def test_nan_pixels_are_exit_2_and_no_png(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    real = AutoencoderKL.decode

    def nan_decode(self, z, *args, **kwargs):  # what non-finite weights in a VAE or a fused LoRA produce
        return (real(self, z, *args, **kwargs)[0].clone().fill_(float("nan")),)

    monkeypatch.setattr(AutoencoderKL, "decode", nan_decode)
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["sample", "--prompt", "a large red circle on the left", "--out", str(out),
                                 "--device", "cpu"])
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and "NaN/inf pixels" in lines[0] and "seed 0" in lines[0]
    assert not list(tmp_path.rglob("*.png"))


def test_finite_pixels_pass_the_check():
    """The check itself: one NaN pixel in position 1 of 3 names position 1 only."""
    img = torch.zeros(3, 3, 4, 4)
    img[1, 0, 2, 2] = float("nan")
    finite = torch.isfinite(img).flatten(1).all(1)
    assert [i for i, ok in enumerate(finite.tolist()) if not ok] == [1]
    err = pipeline.NonFiniteImage([1])
    assert isinstance(err, ValueError) and err.positions == [1]
