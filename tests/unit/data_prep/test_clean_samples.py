import random

import numpy as np
import pytest

from data_prep.clean import BINARY, NOT_UTF8, SkipBook, clean_text, decode_bytes
from data_prep.samples import book_samples, split_of
from data_prep.tokenizer import Encoder, split_for_encoding

from prep_corpora import prose


def test_clean_text_normalizes_and_strips_gutenberg() -> None:
    raw = ("\ufeffHeader junk\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n"
           "Cafe\u0301 au lait.\r\nLine two.\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nLicense")
    assert clean_text(raw) == "Caf\u00e9 au lait.\nLine two."
    assert clean_text("no markers\rat all") == "no markers\nat all"
    with pytest.raises(SkipBook, match="empty"):
        clean_text("\ufeff \n\n ")


def test_decode_rejects_binary_and_other_encodings() -> None:
    with pytest.raises(SkipBook) as binary:
        decode_bytes(bytes(range(256)) * 4)
    assert binary.value.reason == BINARY
    with pytest.raises(SkipBook) as latin1:
        decode_bytes("caf\u00e9 ".encode("latin-1") * 10)
    assert latin1.value.reason == NOT_UTF8


@pytest.mark.parametrize("size", [64, 257, 4096])
def test_chunked_encoding_equals_whole_text(trained_tokenizer, size: int) -> None:
    """Cutting before a space (or after a newline) never changes the ids, for both backends."""
    rng = random.Random(size)
    text = prose(rng, 3000).replace(". ", ".  ", 5)
    chunks = list(split_for_encoding(text, size))
    assert "".join(chunks) == text and len(chunks) > 3
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained_tokenizer))
    spm_ids = Encoder(trained_tokenizer).spm.encode(text)
    assert sum(Encoder(trained_tokenizer).spm.encode(chunks), []) == spm_ids
    assert sum(hf(chunks, add_special_tokens=False)["input_ids"], []) == spm_ids


def test_tail_policies() -> None:
    ids = np.arange(10, dtype=np.int32)
    dropped = book_samples(ids, None, 4, "drop", pad_id=-1)
    assert dropped.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and dropped.loss_mask.all()
    padded = book_samples(ids, None, 4, "pad", pad_id=-1)
    assert padded.input_ids[-1].tolist() == [8, 9, -1, -1] and padded.loss_mask[-1].tolist() == [1, 1, 0, 0]
    assert len(book_samples(ids[:3], None, 4, "drop", pad_id=0)) == 0


def test_split_is_stable_and_roughly_proportional() -> None:
    splits = [split_of(f"book-{i}", 0, 0.1, 0.2) for i in range(3000)]
    assert splits == [split_of(f"book-{i}", 0, 0.1, 0.2) for i in range(3000)]
    assert abs(splits.count("val") / 3000 - 0.1) < 0.03 and abs(splits.count("test") / 3000 - 0.2) < 0.03
    assert splits != [split_of(f"book-{i}", 1, 0.1, 0.2) for i in range(3000)]
