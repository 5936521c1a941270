"""Run by ``python -S -c`` outside the repository: use an export as transformers' pipeline and
lm-evaluation-harness do, with the project not importable.

argv: export_dir data_dir split max_samples work_dir. Prints one JSON line with:
- ``pipeline``: two sampled continuations of a prompt from ``pipeline("text-generation")`` with top_p,
  repetition_penalty and num_return_sequences=2, what transformers logged meanwhile, and a greedy
  continuation of the same prompt without and with a word of it as ``stop_strings``;
- ``loglikelihood``: lm-eval ``HFLM`` over a task YAML of the first max_samples samples of the split,
  written as JSONL (context = the first token's text, or "" when it is BOS, which HFLM then supplies;
  continuation = the rest), per sample, with whether the text re-encodes to the sample's ids;
- ``perplexity``: the same documents as a ``loglikelihood_rolling`` task (word/byte perplexity).
"""

import io
import json
import logging
import sys
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, pipeline
from transformers.utils import logging as hf_logging

try:
    import pipeline as _project  # noqa: F401  (the project's package, if it leaked onto the path)

    project_importable = hasattr(_project, "models")
except ImportError:
    project_importable = False

export_dir, data_dir, split, max_samples, work = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
log = io.StringIO()
hf_logging.get_logger().addHandler(logging.StreamHandler(log))
hf_logging.set_verbosity_warning()

generator = pipeline("text-generation", model=export_dir, trust_remote_code=True)
torch.manual_seed(0)
outputs = generator("The key was in the", do_sample=True, top_p=0.9, repetition_penalty=1.2, num_return_sequences=2,
                    max_new_tokens=40)
tok = generator.tokenizer
prompt = tok("The key was in the", return_tensors="pt")
start = prompt["input_ids"].shape[1]
free = generator.model.generate(**prompt, max_new_tokens=40)[0, start:]
stop = next(w for w in (tok.decode(t).strip() for t in free[4:]) if w.isalpha() and len(w) > 1)  # a word it writes
stopped = generator.model.generate(**prompt, max_new_tokens=40, stop_strings=[stop], tokenizer=tok)[0, start:]
pipeline_report = {"texts": [o["generated_text"] for o in outputs], "log": log.getvalue(), "stop": stop,
                   "free": tok.decode(free), "stopped": tok.decode(stopped)}

tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
manifest = json.loads((data_dir / "manifest.json").read_text())
shards = [datasets.Dataset.from_file(str(data_dir / s["path"])) for s in manifest["shards"] if s["split"] == split]
rows = datasets.concatenate_datasets(shards).select(range(max_samples))
docs = []
for ids in rows["input_ids"]:
    starts_with_bos = ids[0] == tokenizer.bos_token_id
    context = "" if starts_with_bos else tokenizer.decode(ids[:1])
    continuation = tokenizer.decode(ids[1:])
    encoded = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    docs.append({"context": context, "continuation": continuation, "text": context + continuation,
                 "round_trip": encoded == (ids[1:] if starts_with_bos else ids)})
jsonl = work / "docs.jsonl"
jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs))
tasks = work / "tasks"
tasks.mkdir(exist_ok=True)
common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {jsonl}\ntest_split: test\n"
(tasks / "memtrain_continuation.yaml").write_text(
    "task: memtrain_continuation\n" + common + "output_type: loglikelihood\ndoc_to_text: context\n"
    "doc_to_target: continuation\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
(tasks / "memtrain_perplexity.yaml").write_text(
    "task: memtrain_perplexity\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
    "doc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

lm = HFLM(pretrained=export_dir, trust_remote_code=True, device="cpu", batch_size=4, add_bos_token=False, max_length=len(rows[0]["input_ids"]) + 1)
results = simple_evaluate(model=lm, tasks=["memtrain_continuation", "memtrain_perplexity"], log_samples=True,
                          task_manager=TaskManager(include_path=str(tasks)))
samples = sorted(results["samples"]["memtrain_continuation"], key=lambda s: s["doc_id"])
loglikelihood = {"per_sample": [float(s["resps"][0][0][0]) for s in samples],
                 "round_trip": [d["round_trip"] for d in docs]}
perplexity = {k.split(",")[0]: v for k, v in results["results"]["memtrain_perplexity"].items() if "perplexity," in k}
print("\n" + json.dumps({"project_importable": project_importable, "pipeline": pipeline_report,
                         "loglikelihood": loglikelihood, "perplexity": perplexity}))
