"""Run by ``python -S -c`` outside the repository: load exports with plain transformers and score them.

argv: data_dir split max_samples batch_size text export_dir [export_dir ...]. Prints one JSON line:
whether memtrain's own package could be imported (it must not), and per export the per-segment NLL
sums and target counts over the first max_samples samples of the split (the protocol of
pipeline.evaluate), the weights' dtype, a generation from a prompt longer than one segment, and the
tokenizer's ids for ``text``.
"""

import json
import sys
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

try:
    import pipeline  # noqa: F401

    project_importable = True
except ImportError:
    project_importable = False

data_dir, split, max_samples, batch_size, text = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
manifest = json.loads((data_dir / "manifest.json").read_text())
shards = [datasets.Dataset.from_file(str(data_dir / s["path"])) for s in manifest["shards"] if s["split"] == split]
rows = datasets.concatenate_datasets(shards).with_format("torch")
n = min(max_samples, len(rows))


def score(export_dir: str) -> dict:
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    segment_len = model.config.segment_len
    nll, tokens = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = rows[start:min(start + batch_size, n)]
            ids = batch["input_ids"].long()
            counted = batch["loss_mask"].bool()
            counted[:, 0] = False
            out = model(input_ids=ids, labels=ids.masked_fill(~counted, -100))
            nll = nll + out.segment_nll.double()
            tokens = tokens + out.segment_tokens.double()
        prompt = rows[0]["input_ids"][None, : segment_len + segment_len // 2].long()
        generated = model.generate(prompt, max_new_tokens=6)
    return {
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype),
        "tied": model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr(),
        "segment_nll": nll.tolist(),
        "segment_tokens": tokens.tolist(),
        "prompt": prompt[0].tolist(),
        "generated": generated[0].tolist(),
        "default_max_new_tokens": model.generation_config.max_new_tokens,  # from generation_config.json
        "vocab_size": model.config.vocab_size,
        "tokenizer_len": len(tokenizer),
        "text_ids": tokenizer(text)["input_ids"],
        "decoded_generation": tokenizer.decode(generated[0, prompt.shape[1]:]),
    }


results = {export_dir: score(export_dir) for export_dir in sys.argv[6:]}
# On its own line, even after transformers' custom-code prompt (printed without a newline).
print("\n" + json.dumps({"project_importable": project_importable, "exports": results}))
