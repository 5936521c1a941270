"""The tokenizer: train SentencePiece on the corpus or take an HF tokenizer folder; save it in HF form.

A trained tokenizer is saved as ``spm.model`` (what prep encodes with: fast, one process per
worker) plus ``tokenizer.json``/``tokenizer_config.json`` (what ``AutoTokenizer.from_pretrained``
loads). The two give the same ids because SentencePiece is trained so that an HF ``tokenizers``
BPE reproduces it exactly: identity normalization (cleaning already applied NFC), no dummy
prefix, spaces kept as they are, ``\\n`` a piece of its own, byte fallback; training checks the
two agree on a sample. The same settings make encoding invariant to cutting the text just
before a space, so a 50 MB single-line book is encoded in bounded chunks.

Ids: 0 ``<unk>``, 1 ``<s>`` (bos), 2 ``</s>`` (eos), 3 ``<pad>``. ``tokenizer(text)`` adds bos like
Llama's; prep writes ``bos + ids + eos`` per book.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from data_prep.atomic import replace_dir
from data_prep.errors import UserError

SPM_FILE = "spm.model"
SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
NEWLINE = "\n"
MAX_TRAIN_LINE = 2000  # characters; SentencePiece drops training lines longer than max_sentence_length
ENCODE_CHUNK = 1 << 16  # characters per piece of text handed to the tokenizer
ENCODE_BATCH = 16  # pieces per tokenizer call (bounds the Python lists of ids to ~1M characters)


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str  # "spm" (trained here; encoded with sentencepiece) or "hf" (any HF tokenizer folder)
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    hash: str


def folder_hash(folder: Path) -> str:
    """sha256 over the folder's file names and contents (sorted): the tokenizer's identity."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Book texts -> non-empty lines, long lines cut at spaces into <= MAX_TRAIN_LINE characters."""
    for text in texts:
        for line in text.split("\n"):
            while len(line) > MAX_TRAIN_LINE:
                cut = line.rfind(" ", MAX_TRAIN_LINE // 2, MAX_TRAIN_LINE)
                cut = cut if cut > 0 else MAX_TRAIN_LINE
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def train_sentencepiece(lines: Iterator[str], data, out_dir: Path) -> None:
    """Train on ``lines`` (sampled by SentencePiece with a fixed seed) and save the tokenizer folder."""
    spm.set_random_generator_seed(data.seed + 1)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, vocab_size=data.vocab_size,
            model_type=data.tokenizer_type, byte_fallback=data.byte_fallback,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            user_defined_symbols=[NEWLINE], unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=SPECIALS["unk"], bos_piece=SPECIALS["bos"], eos_piece=SPECIALS["eos"],
            pad_piece=SPECIALS["pad"], input_sentence_size=data.tokenizer_sample_sentences,
            shuffle_input_sentence=True, num_threads=data.tokenizer_threads,
            max_sentence_length=4 * MAX_TRAIN_LINE + 16, character_coverage=0.9995, minloglevel=2,
        )
    except RuntimeError as err:
        too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", str(err))
        if too_high:
            raise UserError(f"data.vocab_size={too_high[1]} is more than this corpus supports "
                            f"(at most {too_high[2]}); lower it or add books") from None
        too_low = re.search(r"Vocabulary size is smaller than required_chars. (\d+) vs (\d+)", str(err))
        if too_low:
            raise UserError(f"data.vocab_size={too_low[1]} is below the {too_low[2]} pieces the characters"
                            f"{' and byte fallback' if data.byte_fallback else ''} need; raise it") from None
        raise UserError(f"SentencePiece training failed: {str(err).splitlines()[-1]}") from None
    replace_dir(out_dir, lambda tmp: _save_spm_folder(model.getvalue(), tmp))


def install_tokenizer(source: str, out_dir: Path) -> None:
    """Copy a tokenizer folder (``data.tokenizer``) into the output: a folder written by memtrain is
    copied as is; any other HF folder is loaded and saved again (tokenizer files only)."""
    src = Path(source)
    if not src.is_dir():
        raise UserError(f"data.tokenizer {source} is not a folder")
    if (src / SPM_FILE).is_file():
        files = [p for p in src.iterdir() if p.is_file()]
        replace_dir(out_dir, lambda tmp: [shutil.copyfile(p, tmp / p.name) for p in files])
        return
    tokenizer = _load_hf(src)
    replace_dir(out_dir, lambda tmp: tokenizer.save_pretrained(str(tmp)))


def describe(folder: Path) -> TokenizerInfo:
    """Special ids, vocabulary size and hash of a saved tokenizer folder."""
    if (folder / SPM_FILE).is_file():
        sp = spm.SentencePieceProcessor(model_file=str(folder / SPM_FILE))
        return TokenizerInfo("spm", sp.get_piece_size(), sp.bos_id(), sp.eos_id(), sp.pad_id(), folder_hash(folder))
    tokenizer = _load_hf(folder)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"tokenizer in {folder} has no eos token; prep separates books with it")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return TokenizerInfo("hf", len(tokenizer), bos, eos, pad, folder_hash(folder))


class Encoder:
    """Text -> int32 ids (no special tokens), with the folder's own tokenizer."""

    def __init__(self, folder: Path) -> None:
        if (folder / SPM_FILE).is_file():
            self.spm = spm.SentencePieceProcessor(model_file=str(folder / SPM_FILE))
            self.hf = None
        else:
            self.spm, self.hf = None, _load_hf(folder)

    def encode(self, text: str) -> np.ndarray:
        parts = [self._encode_batch(batch) for batch in _batched(split_for_encoding(text), ENCODE_BATCH)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """Each short text's ids (no chunking), in one tokenizer call."""
        if self.spm is not None:
            pieces = self.spm.encode(texts, num_threads=1)
        else:
            pieces = self.hf(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in pieces]

    def decode(self, ids: list[int]) -> str:
        return self.spm.decode(ids) if self.spm is not None else self.hf.decode(ids, skip_special_tokens=True)

    def _encode_batch(self, chunks: list[str]) -> np.ndarray:
        if self.spm is not None:
            pieces = self.spm.encode(chunks, num_threads=1)
        else:
            pieces = self.hf(chunks, add_special_tokens=False)["input_ids"]
        return np.fromiter((i for ids in pieces for i in ids), dtype=np.int32, count=sum(map(len, pieces)))

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, start and end character offsets of each token (short texts only: no chunking)."""
        if self.spm is not None:
            proto = self.spm.encode(text, return_type="proto")
            ids = [p.id for p in proto.pieces]
            starts, ends = [p.begin for p in proto.pieces], [p.end for p in proto.pieces]
            if not text.isascii():  # sentencepiece offsets are in bytes
                to_char = np.cumsum([0] + [len(c.encode()) for c in text])
                starts = np.searchsorted(to_char, starts).tolist()
                ends = np.searchsorted(to_char, ends).tolist()
        else:
            enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            starts, ends = zip(*enc["offset_mapping"]) if ids else ((), ())
        return (np.asarray(ids, dtype=np.int32), np.asarray(starts, dtype=np.int64),
                np.asarray(ends, dtype=np.int64))


def split_for_encoding(text: str, size: int = ENCODE_CHUNK) -> Iterator[str]:
    """Cut text into pieces of about ``size`` characters, each cut just before a space that follows
    a non-space (or, failing that, after a newline): tokenizers split words there anyway (the
    ones trained here always do, GPT-2/Llama-style ones too), so the ids equal the whole text's.
    Only a run of ``size / 2`` characters without any space or newline is cut blindly."""
    start, n = 0, len(text)
    while n - start > size:
        cut = _cut_point(text, start + size // 2, start + size)
        if cut < 0:  # no space for 64K characters: not prose; a hard cut keeps memory bounded
            cut = start + size
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def _cut_point(text: str, lo: int, hi: int) -> int:
    cut = text.rfind(" ", lo, hi)
    while cut > lo and text[cut - 1].isspace():
        cut = text.rfind(" ", lo, cut)
    if cut > lo:
        return cut
    newline = text.rfind("\n", lo, hi)
    return newline + 1 if newline >= 0 else -1


def _batched(items: Iterator[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def check_agreement(folder: Path, samples: list[str]) -> None:
    """Both halves of a trained tokenizer (sentencepiece, tokenizer.json) must give the same ids."""
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(folder / SPM_FILE))
    for text, encoding in zip(samples, hf.encode_batch(samples, add_special_tokens=False)):
        if sp.encode(text) != encoding.ids:
            raise RuntimeError(f"sentencepiece and tokenizer.json disagree on {text[:80]!r}")


def _save_spm_folder(model: bytes, folder: Path) -> None:
    """spm.model, and the same tokenizer as an HF fast tokenizer (tokenizer.json + config).

    Written with the light ``tokenizers`` package, not transformers (seconds of import)."""
    (folder / SPM_FILE).write_bytes(model)
    sp = spm.SentencePieceProcessor(model_file=str(folder / SPM_FILE))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    bpe = models.BPE(vocab=vocab, merges=_merges(sp, vocab), unk_token=SPECIALS["unk"], byte_fallback=True,
                     fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS.values()])
    tok.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    bos = SPECIALS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers",
              **{f"{name}_token": piece for name, piece in SPECIALS.items()},
              "split_special_tokens": True,  # "<s>" in a book is text, as sentencepiece reads it
              "clean_up_tokenization_spaces": False, "model_max_length": 1 << 40}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _merges(sp, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges that replay SentencePiece: every split of a normal piece into two pieces, the
    pieces with higher scores first (as transformers' SentencePieceExtractor orders them)."""
    merges = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece, score = sp.id_to_piece(i), sp.get_score(i)
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _load_hf(folder: Path):
    from transformers import AutoTokenizer  # lazy: only an HF tokenizer folder needs it (seconds)

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {folder}: {str(err).splitlines()[0]}") from None
