"""Command-line tools on tiny random models."""
import PIL.Image
import torch

from main import parse_args
from models import build_model

from test_models_tiny import SPARSE, TINY


def test_visualize_sparsity_writes_a_png(tmp_path):
    from tools.visualize_sparsity import main as visualize

    args = parse_args([*TINY, *SPARSE, "--rho", "0.2"])
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "checkpoint.pth")
    PIL.Image.new("RGB", (80, 60), (120, 30, 200)).save(tmp_path / "image.jpg")
    out = tmp_path / "sparsity.png"
    visualize(["--resume", str(tmp_path / "checkpoint.pth"), "--image", str(tmp_path / "image.jpg"),
               "--out", str(out), "--size", "64", "--max_size", "96"])
    with PIL.Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 300
