"""Tiny tokenizer folders laid out the way the Hub ships Qwen2, Llama 3 and InternLM2, built from
models trained here on a few lines of text (nothing downloaded). Their config files carry the keys
and templates those models ship with (chat templates shortened to what the tests need)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

CORPUS = [f"user question {i}: what is {i} plus {i}? the answer is {2 * i}." for i in range(200)] + [
    "hello world, how are you today? fine, thanks.", "def f(x):\n    return x + 1\n"]

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
INTERNLM2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# ChatML with {% generation %} markers around what the assistant writes (as SmolLM3-style templates do)
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _bpe(folder: Path, specials: list[str]) -> dict[str, int]:
    """A byte-level BPE tokenizer.json with `specials` as special added tokens; returns their ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return {s: tok.token_to_id(s) for s in specials}


def _added(ids: dict[str, int]) -> dict:
    return {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False} for s, i in ids.items()}


def qwen2(folder: Path, template: str = QWEN2_TEMPLATE) -> Path:
    """Qwen2-Instruct: no BOS (`bos_token: null`), EOS <|im_end|>, ChatML template in tokenizer_config.json."""
    ids = _bpe(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "added_tokens_decoder": _added(ids), "bos_token": None,
        "chat_template": template, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}))
    return folder


def llama3(folder: Path) -> Path:
    """Llama-3-Instruct: tokenizer.json + tokenizer_config.json (BOS <|begin_of_text|>, EOS <|eot_id|>),
    the template in chat_template.jinja (newer transformers), and original/tokenizer.model in tiktoken format."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    ids = _bpe(folder, specials)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": _added(ids), "bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "eos_token": "<|eot_id|>"}))
    (folder / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    (folder / "original").mkdir()
    ranks = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hello"]
    (folder / "original" / "tokenizer.model").write_bytes(
        b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks)))
    return folder


def internlm2(folder: Path) -> Path:
    """InternLM2-chat: a sentencepiece tokenizer.model, tokenizer_config.json whose auto_map points at
    remote code (tokenization_internlm2.py, which must never run) and whose added tokens are pieces."""
    import io

    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=320, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # newlines survive, as in InternLM2
        num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    ids = {t: sp.PieceToId(t) for t in ("<|im_start|>", "<|im_end|>")}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": _added(ids),
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "chat_template": INTERNLM2_TEMPLATE, "tokenizer_class": "InternLM2Tokenizer"}))
    marker = folder / "REMOTE_CODE_RAN"
    (folder / "tokenization_internlm2.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('remote code must not run')\n")
    return folder
