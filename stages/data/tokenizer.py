"""Tokenizers for the data stage: an offline character-level tokenizer for the tiny recipe, loading
any recipe's tokenizer (`load_tokenizer`) and encoding prompt/answer pairs (`encode_pairs`).

One token per character of printable ASCII plus newline, and five special tokens at fixed ids
(they match `NemotronHConfig`'s defaults: pad 0, bos 1, eos 2):

    <pad>=0  <bos>=1  <eos>=2  <unk>=3  <mask>=4

It is a real `PreTrainedTokenizerFast` (saved and reloaded with `AutoTokenizer.from_pretrained`),
built from the `tokenizers` library with no download. Encoding prepends `<bos>`; EOS is appended by
the data stage, not by the tokenizer, so that `tokenizer(prompt)` is exactly what generation starts
from. Character-level means encode(prompt + answer) == encode(prompt) + chars(answer): the answer's
token span is known without any alignment search.

Run `python -m stages.data.tokenizer OUT_DIR` to write one.
"""
from __future__ import annotations

import string
import sys
from typing import Any

PAD, BOS, EOS, UNK, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<mask>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, MASK)
# Printable ASCII without the vertical-space characters `string.printable` also holds (\r \x0b \x0c),
# plus tab and newline. Order is fixed: token ids are part of every saved model.
CHARACTERS: tuple[str, ...] = tuple(c for c in string.printable if c not in "\r\x0b\x0c")


def vocabulary() -> dict[str, int]:
    """The fixed token -> id map: special tokens first, then the characters."""
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    return {tok: i for i, tok in enumerate(tokens)}


def build_char_tokenizer() -> Any:
    """Build the character-level `PreTrainedTokenizerFast` (offline, deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; a class that matches newline is a character too.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join characters back without the spaces WordLevel would add
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        mask_token=MASK,
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    return tok


def load_tokenizer(name: str | None) -> Any:
    """The char tokenizer (None) or `AutoTokenizer.from_pretrained(name)`, with a pad token."""
    if name is None:
        return build_char_tokenizer()
    from transformers import AutoTokenizer

    if name.startswith("package:") or name.endswith(".gguf"):
        from stages.backbones.gguf_files import gguf_tokenizer

        tok = gguf_tokenizer(name, key_name="data.tokenizer")
    else:
        tok = AutoTokenizer.from_pretrained(name)
    if tok.eos_token_id is None:
        raise ValueError(f"data.tokenizer: {name!r} has no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def char_encoder(tok: Any) -> Any:
    """For the char tokenizer of stages/data/tokenizer.py, a plain-Python encoder equal to `tok(text)`
    (`<bos>` + one id per character); None for any other tokenizer."""
    vocab = vocabulary()
    if tok.get_vocab() != vocab:
        return None
    bos, unk = vocab[BOS], vocab[UNK]
    return lambda text: [bos] + [vocab.get(c, unk) for c in text]


def encode_pairs(tok: Any, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of `<bos> prompt answer <eos>` per pair, and a mask that is 1 on the answer and
    its EOS (batched: one tokenizer call for all prompts, one for all full texts)."""
    if not pairs:
        return []
    encode = char_encoder(tok)
    if encode is not None:  # the char tokenizer: a dict lookup, ~20x faster than the HF call
        prompts = [encode(p) for p, _ in pairs]
        fulls = [encode(p + a) for p, a in pairs]
    else:
        prompts = tok([p for p, _ in pairs]).input_ids
        fulls = tok([p + a for p, a in pairs]).input_ids
    out = []
    for (_, answer), p, full in zip(pairs, prompts, fulls):
        if full[: len(p)] != p:  # a subword tokenizer merged across the boundary: encode apart
            full = p + tok(answer, add_special_tokens=False).input_ids
        ids = full + [tok.eos_token_id]
        out.append((ids, [0] * len(p) + [1] * (len(ids) - len(p))))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m stages.data.tokenizer OUT_DIR", file=sys.stderr)
        return 2
    build_char_tokenizer().save_pretrained(argv[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
