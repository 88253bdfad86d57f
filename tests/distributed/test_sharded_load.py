"""Foreign weights load into sharded models (gloo): FSDP2 on one rank and tensor parallelism on two give the
unsharded model's logits, for a Hugging Face folder (Qwen3: q/k norm, explicit head_dim) and an InternEvo
checkpoint (tp2 x pp2 shards). load_sharded.py runs in layout_runs.py's launches; the folders are
layout_data.write_sources'."""

import json
from pathlib import Path

import pytest
import torch

from spindle.interop.families import model_config_from_hf
from spindle.interop.hf import load_hf_weights
from spindle.interop.internevo import load_internevo_weights, read_internevo
from spindle.config import ModelConfig
from spindle.model.llama import build_model

pytestmark = pytest.mark.dist
transformers = pytest.importorskip("transformers")


def unsharded(kind, folder):
    if kind == "hf":
        section = model_config_from_hf(json.loads((folder / "config.json").read_text()))
    else:
        section = read_internevo(folder).model
    model = build_model(ModelConfig.model_validate(section).to_args(), seed=0)
    (load_hf_weights if kind == "hf" else load_internevo_weights)(model, folder)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize("layout, nproc", [
    pytest.param("fsdp", 1, marks=pytest.mark.runs("load_sharded_fsdp")),
    pytest.param("tp", 2, marks=pytest.mark.runs("load_sharded_tp")),
])
def test_sharded_model_loads_foreign_weights(layout_runs, layout, nproc):
    results = layout_runs[f"load_sharded_{layout}"].output()
    assert len(results) == 2
    for spec, got in results.items():
        kind, folder = spec.split(":", 1)
        assert "DTensor" in got["param_types"], got["param_types"]  # the model really was sharded
        diff = (got["logits"] - unsharded(kind, Path(folder))).abs().max().item()
        print(f"PARITY sharded {layout} x{nproc} {kind}: {diff:.2e}")  # docs/interop.md (pytest -s)
        assert diff <= 1e-5, f"{layout} {kind}: {diff:.2e}"
