"""Secrets kept out of what Spindle writes: every config.json (the run's and each checkpoint's, which travel
with shared checkpoints and S3 uploads), log lines, alerts. The run itself keeps using the real values:
only copies made for writing or printing go through here. Pure functions, no state.

The rule (docs/reliability.md, "Secrets"); a hidden value becomes REDACTED, "<redacted>":
- credential names: a key (config key, URL query parameter, NAME=value in a line) whose name, compared
  case-insensitively with separators removed, holds secret, password, passwd, passphrase, credential, apikey,
  accesskey or privatekey, or has a word auth, oauth, authorization, signature or cookie, or ends with the word
  token (not the tokenizer's pad/eos/bos/unk/... tokens; `max_tokens`, `tokenizer_path`, `token_dropping` are
  kept): its value is hidden, all of it (every leaf below it for a dict or list), except None, booleans and
  empty values, which hide nothing; in a URL query also key, sig, sign, code, pwd and pass;
- alert destinations: a key with a word address, webhook or hook keeps the scheme, host and port of its URL
  and loses the rest (`https://open.feishu.cn/<redacted>`), so one still sees where alerts go;
- every URL in any other string keeps scheme, host, port and path but loses its user info
  (`https://<redacted>@host/...`), the values of credential query parameters (`?token=<redacted>`) and, on
  http(s), the path below a hook segment (Feishu / Lark `.../hook/<redacted>`, Discord `/webhooks/<redacted>`,
  `hooks.slack.com/services/<redacted>`);
- AWS access key ids (AKIA... / ASIA... and 16 more) are hidden wherever they appear;
- a value found under a credential name is hidden wherever else it appears in the same config.
"""

from __future__ import annotations

import re
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
_CREDENTIAL_PARTS = ("secret", "password", "passwd", "passphrase", "credential", "apikey", "accesskey", "privatekey")
_CREDENTIAL_WORDS = frozenset({"auth", "oauth", "authorization", "signature", "cookie"})
_QUERY_CREDENTIALS = frozenset({"key", "sig", "sign", "code", "pwd", "pass"})
_TOKENIZER_TOKENS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "stop"})
_DESTINATION_WORDS = frozenset({"address", "webhook", "hook"})
_MIN_SECRET_LEN = 6  # shorter values under credential names ("abc") would mask ordinary text elsewhere

_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_SEPARATORS = re.compile(r"[^A-Za-z0-9]+")
# what every credential name holds somewhere, lower-cased: a line without any of these has no pair to hide
# (the fast path of a metrics line, which holds "tokens" but never "token" alone)
_CREDENTIAL_HINTS = ("secret", "passw", "passphrase", "credential", "key", "auth", "signature", "cookie", "token")
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*[^\s'\"<>`.,;:)\]}]")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
# NAME=value, NAME: value, "NAME": "value" in a line; the value quoted, or a bare word (an optional
# Bearer / Basic / Token scheme word with it) that stops before any character JSON gives a meaning to, so
# that replacing it keeps a JSON line JSON
_PAIR = re.compile(r"(?<![\w./])(?P<name>[A-Za-z_][\w./-]*)(?P<q>[\"']?)(?P<sep>\s*[=:]\s*)"
                   r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'[^']*'|(?:(?:Bearer|Basic|Token)\s+)?[^\s\\\"'&,;#()\[\]{}]+)")
# bare JSON / Python literals: a number or constant in a JSON line stays one, so the line stays JSON
_LITERAL = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null|True|False|None|inf|nan")


def _words(name: str) -> list[str]:
    """'AWS_SECRET_ACCESS_KEY' -> ['aws', 'secret', 'access', 'key']; 'apiKey' -> ['api', 'key']."""
    return [w for w in _SEPARATORS.split(_CAMEL.sub(r"\1 \2", name).lower()) if w]


def is_credential_name(name: str) -> bool:
    """Whether a key named `name` holds a credential (the module docstring gives the rule)."""
    words = _words(str(name))
    compact = "".join(words)
    if any(part in compact for part in _CREDENTIAL_PARTS) or _CREDENTIAL_WORDS.intersection(words):
        return True
    return bool(words) and words[-1] == "token" and not (len(words) > 1 and words[-2] in _TOKENIZER_TOKENS)


def is_destination_name(name: str) -> bool:
    """Whether a key named `name` says where alerts or heartbeats go (monitor.alert.feishu_alert_address)."""
    return bool(_DESTINATION_WORDS.intersection(_words(str(name))))


def _hides_something(leaf: Any) -> bool:
    return not (leaf is None or isinstance(leaf, bool) or (isinstance(leaf, str) and not leaf))


def _query(query: str) -> str:
    """'a=1&token=x' -> 'a=1&token=<redacted>' (the rest of the query as written)."""
    def one(item: str) -> str:
        name, eq, value = item.partition("=")
        hidden = is_credential_name(name) or "".join(_words(name)) in _QUERY_CREDENTIALS
        return f"{name}={REDACTED}" if eq and value and hidden else item

    return "&".join(one(item) for item in query.split("&"))


def _hook_path(path: str, host: str) -> str:
    """The path with every segment below a hook segment hidden; on a hook host (hooks.slack.com) the
    first segment is the hook segment."""
    segments = path.split("/")
    named = [i for i, s in enumerate(segments) if "hook" in s.lower()]
    first = named[0] if named else next((i for i, s in enumerate(segments) if s), None) if "hook" in host else None
    if first is None or not any(segments[first + 1:]):
        return path
    return "/".join(segments[:first + 1] + [REDACTED])


def _netloc(netloc: str) -> str:
    return f"{REDACTED}@{netloc.rpartition('@')[2]}" if "@" in netloc else netloc


def redact_url(url: str) -> str:
    """One URL with its user info, credential query values and hook path hidden (the module docstring)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a bad IPv6 host: nothing of it is trusted to be harmless
        return REDACTED
    if not parts.netloc:
        return url
    path = _hook_path(parts.path, (parts.hostname or "").lower()) \
        if parts.scheme.lower() in ("http", "https") else parts.path
    fragment = _query(parts.fragment) if "=" in parts.fragment else parts.fragment  # OAuth's #access_token=
    return urlunsplit((parts.scheme, _netloc(parts.netloc), path, _query(parts.query), fragment))


def redact_destination(address: str) -> str:
    """Where alerts go, without what authorises them: scheme, host and port only
    ('https://open.feishu.cn/open-apis/bot/v2/hook/abc' -> 'https://open.feishu.cn/<redacted>'); an address
    without a scheme ('127.0.0.1:9000/beat') is read the way the monitor reads it."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    host, tail = re.match(r"([^/?#]*)(.*)", rest, re.DOTALL).groups()
    return f"{scheme}{sep}{_netloc(host)}{'/' + REDACTED if tail.strip('/') else tail}"


def _hide_pairs(text: str) -> str:
    """The values of credential-named pairs hidden. After any other name the scan goes on right behind the
    name, so pairs inside its value (a JSON message, `failed: HF_TOKEN=...`) are seen too."""
    out, pos = [], 0
    while (match := _PAIR.search(text, pos)) is not None:
        value = match["value"]
        if is_credential_name(match["name"]) and not (value.startswith(REDACTED) or _LITERAL.fullmatch(value)):
            quote = value[0] if value[0] in "\"'" else ""
            out.append(f"{text[pos:match.start('value')]}{quote}{REDACTED}{quote}")
            pos = match.end()
        else:
            out.append(text[pos:match.end("name")])
            pos = match.end("name")
    return "".join(out) + text[pos:]


def redact_text(text: str, known: Iterable[str] = ()) -> str:
    """A line to print or write with its secrets hidden: the `known` secret values, URLs (redact_url), AWS
    key ids and the values of NAME=value / "NAME": "value" pairs with credential names. A JSON line stays
    JSON (a number is never replaced, a string only inside its quotes)."""
    for secret in sorted({s for s in known if s and len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    if "://" in text:
        text = _URL.sub(lambda m: redact_url(m[0]), text)
    if "AKIA" in text or "ASIA" in text:
        text = _AWS_KEY_ID.sub(REDACTED, text)
    hints = text.lower().replace("tokens", "").replace("tokenizer", "")
    return _hide_pairs(text) if any(hint in hints for hint in _CREDENTIAL_HINTS) else text


def credential_values(obj: Any, hidden: bool = False) -> set[str]:
    """Every string (of a useful length) held under a credential name in a nested config."""
    if isinstance(obj, dict):
        return set().union(*(credential_values(v, hidden or is_credential_name(k)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return set().union(*(credential_values(v, hidden) for v in obj))
    return {obj} if hidden and isinstance(obj, str) and len(obj) >= _MIN_SECRET_LEN else set()


def _walk(value: Any, name: str, hidden: bool, known: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _walk(v, str(k), hidden or is_credential_name(str(k)), known) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, name, hidden, known) for v in value]
    if hidden:
        return REDACTED if _hides_something(value) else value
    if not isinstance(value, str):
        return value
    return redact_text(redact_destination(value) if is_destination_name(name) else value, known)


def redact(config: Any) -> Any:
    """A copy of a nested config (dicts, lists, tuples as lists, strings, numbers) to write or show, with
    every secret hidden by the rule of the module docstring; other leaves are kept as they are."""
    return _walk(config, "", False, credential_values(config))
