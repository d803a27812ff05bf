"""A fine-tuned checkpoint becomes theta_ft - theta_0, read a few rows at a time."""
import torch
from safetensors.torch import load_file

from engine.safetensors_io import read_header, save_tensors
from store import weights


def test_the_difference_is_taken_in_float64_and_rounded_once_piece_by_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "CONVERT_ROWS_ENTRIES", 1000)  # many pieces per tensor, a row split across none
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(37, 101, generator=generator), "half": torch.randn(64, 50, generator=generator).half(),
            "scalar": torch.tensor(0.25), "bias": torch.randn(300, generator=generator),
            "same": torch.randn(20, 30, generator=generator), "steps": torch.arange(7)}
    tuned = dict(base)
    tuned["w"] = base["w"] + 1e-3 * torch.randn(37, 101, generator=generator)
    tuned["half"] = (base["half"].float() + 1e-2 * torch.randn(64, 50, generator=generator)).half()
    tuned["scalar"] = torch.tensor(0.75)
    tuned["bias"] = base["bias"].clone()
    tuned["bias"][299] += 1.0  # only the last piece differs
    base_path, tuned_path, out = (tmp_path / f"{name}.safetensors" for name in ("base", "ft", "tau"))
    save_tensors(base_path, base)
    save_tensors(tuned_path, tuned)
    weights.finetuned_to_task_vector(tuned_path, read_header(tuned_path), base_path, read_header(base_path), out)
    tau = load_file(str(out))
    assert sorted(tau) == ["bias", "half", "scalar", "w"]
    for name, value in tau.items():
        expected = (tuned[name].double() - base[name].double()).to(base[name].dtype)
        assert value.dtype == base[name].dtype and torch.equal(value, expected), name
