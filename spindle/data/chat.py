"""Conversations -> token ids and a loss mask (loss on what the assistant writes, nothing else).

With a chat template (the tokenizer folder's, `Tokenizer.chat_template`), the conversation is
rendered by transformers' own Jinja environment (`render_jinja_template`: the sandbox, filters
and `{% generation %}` tag every Hub template is written for). What the assistant writes is found
by the template's `{% generation %}` blocks where it has them, else by rendering incrementally:
turn i of the assistant spans from the end of `render(messages[:i], add_generation_prompt=True)`
to the end of `render(messages[:i+1])`, so its end-of-turn token is trained and the header the
template writes before it is not.

Control tokens: the template's own (`<|im_start|>`, `<|eot_id|>`, bos_token) become their ids.
Text in the messages that looks like one stays text: before rendering, every control token in
message content is wrapped in two private-use characters, and the rendered text is cut at those
marks (transformers does the same in `mark_control_tokens`), so data cannot inject a turn.

Without a template, today's InternEvo-style rendering: [BOS] `<|System|>:`/`<|User|>:` turns,
`<|Bot|>:` before each answer, [EOS]; answers and the EOS trained.
"""

from __future__ import annotations

import re
from typing import Optional

from spindle.errors import SpindleError
from spindle.extras import require

# what needs transformers here: rendering a tokenizer's chat template (the fallback rendering needs nothing)
CHAT_TEMPLATES = "a tokenizer's chat template"
ROLE_PREFIX = {"system": "<|System|>:", "user": "<|User|>:", "assistant": "<|Bot|>:"}
MARK_START, MARK_END = "\U000f0000", "\U000f0001"  # private-use: never in real text


def check_messages(messages, where: str) -> list[dict]:
    """A conversation as a list of {"role": str, "content": str} with at least one assistant turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise SpindleError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise SpindleError(f"{where}: message {j}: need a string 'role' and a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise SpindleError(f"{where}: no assistant message (nothing to train on)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _fallback_segments(messages: list[dict], where: str) -> list[tuple[str, bool]]:
    segs = []
    for j, m in enumerate(messages):
        if m["role"] not in ROLE_PREFIX:
            raise SpindleError(f"{where}: message {j}: role {m['role']!r} is not one of {sorted(ROLE_PREFIX)} "
                               f"(the tokenizer has no chat template that could render it)")
        if m["role"] == "assistant":
            segs += [(ROLE_PREFIX["assistant"], False), (m["content"] + "\n", True)]
        else:
            segs.append((ROLE_PREFIX[m["role"]] + m["content"] + "\n", False))
    return segs


def _encode_piece(tok, text: str) -> list[int]:
    """A piece from the middle of a conversation. sentencepiece models that add a dummy prefix
    would put a space before every piece; encoding after a newline and dropping it avoids that."""
    if tok.kind != "sentencepiece":
        return tok.encode(text)
    nl = tok.encode("\n")
    ids = tok.encode("\n" + text)
    return ids[len(nl):] if ids[: len(nl)] == nl else tok.encode(text)


def _as_text(tok, token: str, token_id: int) -> list[int]:
    """A control token's text as plain text. sentencepiece matches its user-defined pieces inside
    text, so the text goes in two halves there (neither holds the whole token)."""
    ids = _encode_piece(tok, token)
    if token_id in ids:
        ids = _encode_piece(tok, token[:1]) + _encode_piece(tok, token[1:])
    return ids


def _render(template: str, messages: list[dict], where: str, generation: bool = False, **kwargs):
    TemplateError = require("jinja2", "hf", CHAT_TEMPLATES).TemplateError
    templates = require("transformers.utils.chat_template_utils", "hf", CHAT_TEMPLATES)
    try:
        rendered, spans = templates.render_jinja_template([messages], chat_template=template,
                                                          return_assistant_tokens_mask=generation, **kwargs)
    except (TemplateError, TypeError, ValueError) as e:
        raise SpindleError(f"{where}: the chat template refused the conversation ({type(e).__name__}: {e})") from None
    return rendered[0], (spans[0] if generation else None)


def _assistant_spans(template: str, messages: list[dict], full: str, where: str, kw: dict) -> list[tuple[int, int]]:
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, _ = _render(template, messages[:i], where, add_generation_prompt=True, **kw)
        upto, _ = _render(template, messages[: i + 1], where, **kw)
        if not (full.startswith(upto) and upto.startswith(head)):
            raise SpindleError(f"{where}: the chat template does not render this conversation incrementally (turn {i} "
                               f"changes what comes before it), so the assistant turns cannot be located; a template "
                               f"with {{% generation %}} blocks can")
        spans.append((len(head), len(upto)))
    return spans


def _template_tokens(tok, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    template = tok.chat_template
    specials = tok.special_tokens()
    control = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or "(?!)")
    marked = [m | {"content": control.sub(lambda x: MARK_START + x.group(0) + MARK_END,
                                          m["content"].replace(MARK_START, "").replace(MARK_END, ""))}
              for m in messages]
    kw = {"bos_token": tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
          "eos_token": tok.token_text(tok.eos_id)}
    has_generation = re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
    full, spans = _render(template, marked, where, generation=has_generation, **kw)
    if not has_generation:
        spans = _assistant_spans(template, marked, full, where, kw)
    cuts = sorted({0, len(full), *(p for span in spans for p in span)})
    pieces = re.compile(f"{MARK_START}({control.pattern}){MARK_END}|[{MARK_START}{MARK_END}]|({control.pattern})")
    ids: list[int] = []
    mask: list[bool] = []

    def emit(new: list[int], at: int) -> None:
        trained = any(a <= at < b for a, b in spans)
        ids.extend(new)
        mask.extend([trained] * len(new))

    def text(a: int, b: int) -> None:  # plain text, cut where an assistant span starts or ends
        inner = [a] + [c for c in cuts if a < c < b] + [b]
        for x, y in zip(inner, inner[1:]):
            if y > x:
                emit(_encode_piece(tok, full[x:y]), x)

    pos = 0
    for m in pieces.finditer(full):
        text(pos, m.start())
        if m.group(1) is not None:  # a control token written by the data: text
            emit(_as_text(tok, m.group(1), specials[m.group(1)]), m.start())
        elif m.group(2) is not None:  # a control token written by the template
            emit([specials[m.group(2)]], m.start())
        pos = m.end()
    text(pos, len(full))
    return ids, mask


def conversation_tokens(tok, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """(ids, trained) of one checked conversation: `trained[j]` is True for the tokens the
    assistant writes (the loss mask)."""
    if tok.chat_template:
        return _template_tokens(tok, messages, where)
    segs = _fallback_segments(messages, where)
    ids, mask = ([], []) if tok.bos_id is None else ([tok.bos_id], [True])  # BOS stored positive, as the seed's tool
    for text, trained in segs:
        piece = tok.encode(text)
        ids += piece
        mask += [trained] * len(piece)
    return ids + [tok.eos_id], mask + [True]


def alpaca_messages(record: dict, where: str) -> list[dict]:
    """An Alpaca record (instruction, optional input, output) as a one-turn conversation; without a
    template it renders exactly as the seed's tool does (`<|User|>:{instruction}\\n{input}\\n<|Bot|>:{output}\\n`)."""
    for k in ("instruction", "output"):
        if not isinstance(record.get(k), str):
            raise SpindleError(f"{where}: missing or non-string {k!r}")
    inp = record.get("input") or ""
    if not isinstance(inp, str):
        raise SpindleError(f"{where}: 'input' must be a string")
    prompt = f"{record['instruction']}\n{inp}" if inp else record["instruction"]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def text_or_conversation(value, where: str) -> Optional[str | list[dict]]:
    """A dataset cell as a document: a string, a conversation (list of messages), or None (empty).
    Anything else is refused rather than trained on as its Python repr."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        return check_messages(value, where)
    raise SpindleError(f"{where}: holds a {type(value).__name__}, expected text or a list of "
                       f"{{role, content}} messages")
