"""Journey 4, the seed guide's data path: raw text -> tools/tokenizer.py -> train on the .bin ->
`spindle convert to-hf` -> transformers loads, tokenizes and generates from the export alone."""

import json

import pytest

from tests.journeys.shell import ok, sh, steps, user_folder

pytestmark = pytest.mark.journeys

DOCS = ["def add(a, b):\n    return a + b\n", "Hello world, this is a tiny corpus.\n",
        "import os\nprint(os.getcwd())\n"]


def test_tokenizer_tool_train_export_and_generate_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = user_folder(tmp_path)
    (folder / "raw_data.jsonl").write_text("".join(json.dumps({"text": d * 40}) + "\n" for d in DOCS))
    r = ok(sh("python tools/tokenizer.py --text_input_path raw_data.jsonl --bin_output_path data/train/cn/output.bin",
              folder))
    assert "3 documents" in r.stdout and (folder / "data/train/cn/output.bin.meta").is_file()
    # the seed's config shape: TRAIN_FOLDER of tokenized .bin files, the tools' default tokenizer (1024 ids)
    r = ok(sh("python train.py --config ./configs/demo.py --set data.train_folder=data/train data.type=tokenized "
              "data.tokenizer_path=None model.vocab_size=1024 data.total_steps=3 trainer.log_every=1 "
              "trainer.sample_tokens=8", folder))
    assert steps(r.stdout) == [0, 1, 2] and "checkpoint saved at step 3" in r.stdout
    r = ok(sh("spindle convert to-hf runs/demo/ckpt hf_out/", folder))
    assert "LlamaForCausalLM" in r.stdout and "tokenizer: default" in r.stdout

    tok = transformers.AutoTokenizer.from_pretrained(str(folder / "hf_out"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder / "hf_out"))
    prompt = tok("import os", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, prompt.input_ids.shape[1] + 8) or int(out[0, -1]) == tok.eos_token_id
    assert tok.decode(out[0], skip_special_tokens=True).startswith("import os")
    assert model.generation_config.bos_token_id == tok.bos_token_id is not None
