"""save_pretrained -> AutoModelForCausalLM.from_pretrained(trust_remote_code=True) in a process that
cannot import memtrain: same logits, same generation."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from clean_python import run_without_project
from model_support import random_ids, tiny_model

CHILD = textwrap.dedent("""
    import importlib.util, json, sys
    import torch
    from transformers import AutoModelForCausalLM

    job = json.loads(sys.argv[1])
    ids = torch.tensor(job["ids"])
    results = {}
    for name, folder in job["folders"].items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(ids).logits
        results[name] = {"logits": logits.tolist(),
                         "generated": model.generate(ids[:, :20], max_new_tokens=4).tolist(),
                         "loss": float(model(ids, labels=ids).loss)}
    importable = [name for name in ("pipeline", "data_prep") if importlib.util.find_spec(name) is not None]
    print(json.dumps({"project_importable": importable, "results": results}))
""")

SAVED_CODE = {"modeling_memtrain.py", "configuration_memtrain.py", "fused_head.py"}


def test_export_loads_without_the_project(tmp_path: Path):
    ids = random_ids(2, 3, seed=3)
    models = {"rmt_gpt2": tiny_model("rmt", "gpt2"), "armt_llama": tiny_model("armt", "llama")}
    folders = {}
    for name, model in models.items():
        folder = tmp_path / name
        model.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"] == {"AutoConfig": "configuration_memtrain.MemoryModelConfig",
                                      "AutoModelForCausalLM": "modeling_memtrain.MemoryModelForCausalLM"}
        assert config["decoder_config"]["model_type"] == name.split("_")[1]
        assert SAVED_CODE <= {p.name for p in folder.glob("*.py")}
        folders[name] = str(folder)
    report = run_without_project(CHILD, json.dumps({"ids": ids.tolist(), "folders": folders}), tmp=tmp_path)
    assert report["project_importable"] == []
    results = report["results"]
    for name, model in models.items():
        with torch.no_grad():
            torch.testing.assert_close(torch.tensor(results[name]["logits"]), model(ids).logits, rtol=0, atol=1e-5)
            assert results[name]["loss"] == pytest.approx(float(model(ids, labels=ids).loss), rel=1e-5)
        assert results[name]["generated"] == model.generate(ids[:, :20], max_new_tokens=4).tolist()

