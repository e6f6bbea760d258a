"""Where S's tokens are in an answer: the answer tokenized by the run's own tokenizer, S's tokens marked.

The tokenizer is the run's own: tokenizer.json in a student folder, or in a model directory that eval.json or
direction.json names, accepted only if its vocabulary hash is safety_tokens.json's `tokenizer_fingerprint`.
Loading it with the `tokenizers` library takes ~0.2 s and needs no network; encoding the demo's 1,260 answers
takes another ~0.3 s. The answers are the decoded text Stage 4 kept, encoded again: on rare non-canonical
splits these tokens can differ from the ones the model generated. Without such a tokenizer nothing is marked,
and the report says so.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer  # transformers' tokenizer library: a file in, no network, no model

from safesteer.chat import tokenizer_fingerprint


def split_at(text: str, ids: list[int], offsets: list[tuple[int, int]], s_text: dict[int, str]):
    """(parts, hits): text cut into [plain, S, plain, S, ..., plain], each odd part exactly one token of S as
    it decodes (s_text: id -> decoded string), and the ids of those tokens.

    With S = {' not': 441}: split_at("I can not", [57, 540, 441], [(0, 1), (1, 5), (5, 9)], {441: " not"})
    == (["I can", " not", ""], [441]). A token whose characters do not decode to it alone (a byte of a
    multi-byte character) is not marked."""
    parts, hits, at = [], [], 0
    for i, (start, end) in zip(ids, offsets):
        if i in s_text and start >= at and text[start:end] == s_text[i]:
            parts += [text[at:start], text[start:end]]
            hits.append(i)
            at = end
    return parts + [text[at:]], hits


def candidate_dirs(run) -> list[Path]:
    """Where the run's tokenizer may be: its student folders, then the model directories its files name."""
    dirs = [s.path for s in run.students]
    specs = [m.get("spec", "") for m in ((run.evaluation or {}).get("models") or {}).values()]
    specs += [(run.direction or {}).get("model", ""), (run.evaluation or {}).get("base_model", "")]
    dirs += [Path(s) for s in specs if isinstance(s, str) and s and not s.startswith("steer:")]
    return list(dict.fromkeys(d for d in dirs if (d / "tokenizer.json").is_file()))


class Highlighter:
    """S's tokens in texts. `source` says which tokenizer was used, or why none was."""

    def __init__(self, run):
        self.tokenizer, self.s_text, self.counts = None, {}, Counter()  # counts: (model, id) -> hits
        if not run.tokens:
            self.source = "no safety_tokens.json: no S to mark"
            return
        want = run.tokens.get("tokenizer_fingerprint")
        for d in candidate_dirs(run):
            try:
                tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            except Exception:  # noqa: BLE001 (tokenizers' own kinds: one that fails is not the run's)
                continue
            if want is None or tokenizer_fingerprint(tok) == want:
                self.tokenizer, self.source = tok, str(d / "tokenizer.json")
                self.s_text = {i: tok.decode([i]) for i in run.tokens["token_ids"]}
                return
        self.source = ("no tokenizer.json with safety_tokens.json's tokenizer_fingerprint in the run's "
                       "student or model folders: S is not marked")

    def split(self, texts: list[str], model: str | None = None) -> list[list[str]]:
        """Each text as split_at's parts; S's hits are counted under `model`."""
        if self.tokenizer is None:
            return [[t] for t in texts]
        out = []
        for text, enc in zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            parts, hits = split_at(text, enc.ids, enc.offsets, self.s_text)
            self.counts.update((model, i) for i in hits)
            out.append(parts)
        return out
