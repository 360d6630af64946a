"""The demo models' tokenizer: a byte-level BPE trained with `tokenizers` on Python sources.

`<|begin_of_text|>` (id 0) and `<|end_of_text|>` (id 1) are the special tokens; the post-processor
prepends BOS to every encoding, as Llama 3's does. demo-tiny trains on the lines of a few stdlib
files (`file_lines`), stdlib-5m on whole files of its training split (`file_texts`): the two split
the text differently, so the pre-tokenizer sees different words and the vocabularies differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def file_texts(files: Iterable[Path]) -> Iterator[str]:
    """Each file as one text (bytes that are not UTF-8 read as U+FFFD)."""
    return (p.read_text(encoding="utf-8", errors="replace") for p in files)


def file_lines(files: Iterable[Path]) -> Iterator[str]:
    """Each file's lines, every one but a file's last ending in its "\\n": what `Tokenizer.train`
    reads from a list of files, so training on these reproduces training on the files."""
    for path in files:
        text = path.read_text(encoding="utf-8")  # Tokenizer.train refuses a file that is not UTF-8
        lines = text.split("\n")
        yield from (line + "\n" for line in lines[:-1])
        if lines[-1]:
            yield lines[-1]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (BOS and EOS included) trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tok
