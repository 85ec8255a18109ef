"""Pretraining data: tokenizers (byte, a byte-level BPE trained here on a few KB), the token store
(windows equal the in-memory packing of the same documents, across shard boundaries), corpora of
every format, `vocab_size: auto`, and a BPE run exported and loaded with its tokenizer."""

from __future__ import annotations

import gzip
import json

import jax
import numpy as np
import pytest

import titans
from titans.configfile import ConfigError
from titans.tokenizer import ByteTokenizer, load_tokenizer
from titans.train.config import load_run_config
from titans.train.data import bpe, corpus, pipeline, store
from titans.train.trainer import train

# One worker runs this module, so its fixtures (trained runs) are built once.
pytestmark = pytest.mark.xdist_group("data")

WORDS = ("the memory writes what surprises it and forgets what it no longer needs while attention reads "
         "café naïve über").split()
TEXT = "Mr. Darcy's pride — and Elizabeth's prejudice ✓ — café\n\twith tabs"
FIELDS = dict(seq_len=32, batch_size=2, log_every=1, eval_every=2, eval_batches=1, checkpoint_every=2,
              sample_tokens=0, warmup_steps=1)


def documents(rng, count, size=60):
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(size // 2, size)))) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A flat corpus of .txt files, and a byte-level BPE of 300 ids trained on it."""
    root = tmp_path_factory.mktemp("data")
    (root / "flat").mkdir()
    for i, text in enumerate(documents(np.random.default_rng(0), 45)):
        (root / "flat" / f"doc{i:02d}.txt").write_text(text)
    bpe.train_bpe((t for _, t in corpus.iter_documents(root / "flat")), 300, root / "bpe")
    return root


def test_tokenizers_round_trip_and_count_bytes(folder):
    byte, sub = ByteTokenizer(), load_tokenizer(folder / "bpe")
    for tok in (byte, sub):
        ids = tok.encode(TEXT)
        assert tok.decode(ids) == TEXT and tok.count_bytes(ids) == len(TEXT.encode())
        assert [list(x) for x in tok.encode_batch([TEXT, "a"])] == [list(ids), list(tok.encode("a"))]
    assert sub.vocab_size == 300 and sub.eos == load_tokenizer(folder / "bpe" / "tokenizer.json").eos
    assert len(sub.encode(TEXT)) < len(byte.encode(TEXT))  # merges learned
    assert (sub.eos, sub.pad, sub.bos) == (0, 1, None)  # <|endoftext|>, <|pad|>, no BOS
    assert load_tokenizer(folder / "bpe", eos="<|pad|>").eos == 1
    with pytest.raises(ValueError, match=r"data.eos_token='<nope>' is not a token of .*tokenizer.json"):
        load_tokenizer(folder / "bpe", eos="<nope>")
    (folder / "broken.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="is not a tokenizer.json the tokenizers library reads"):
        load_tokenizer(folder / "broken.json")
    with pytest.raises(FileNotFoundError, match="data.tokenizer takes byte, a tokenizer name"):
        load_tokenizer(folder / "nowhere")
    with pytest.raises(FileExistsError, match="already exists"):
        bpe.train_bpe(["x"], 300, folder / "bpe")


def test_count_bytes_of_a_sentencepiece_style_tokenizer(folder):
    """A Llama-style vocabulary ("▁" for spaces, `<0xXX>` byte fallback, a Metaspace decoder): bytes
    are counted from what each token adds to the text, a fallback token as one byte, so bits per
    byte stay right (within the one space Metaspace prepends to a text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    fallback = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"])
    tok.train_from_iterator([t for _, t in corpus.iter_documents(folder / "flat")], trainer=trainer)
    spec = json.loads(tok.to_str())  # the fallback bytes join the model's vocabulary, as in Llama's
    for token in fallback:
        spec["model"]["vocab"].setdefault(token, len(spec["model"]["vocab"]))
    (folder / "sp.json").write_text(json.dumps(spec))
    sp = load_tokenizer(folder / "sp.json", eos="</s>")
    for text in ("the memory writes what surprises it", "café über naïve ✓ — tabs\t", TEXT):
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert 0 <= sp.count_bytes(ids) - len(text.encode()) <= 1, (text, sp.count_bytes(ids))


@pytest.mark.parametrize("tok_name", ["byte", "bpe"])
def test_store_streams_equal_the_in_memory_packing(folder, tmp_path, tok_name):
    """Every split of a store, read by slices across shards of 100 tokens, is `pack` of the same
    documents in order; the training windows over it are those over the packed array."""
    tok = ByteTokenizer() if tok_name == "byte" else load_tokenizer(folder / "bpe")
    out = store.prepare(folder / "flat", tok, tmp_path / "store", shard_tokens=100)
    train_tokens, valid_tokens, index = store.open_store(out, tok)
    texts = corpus.load_split(str(folder / "flat"))
    for stream, split_texts in zip((train_tokens, valid_tokens), texts):
        want = pipeline.pack(split_texts, tok, seed=None)
        assert len(stream) == len(want) and np.array_equal(stream[:], want)
        assert np.array_equal(stream[95:215], want[95:215])  # three shards in one read
    assert index["splits"]["valid"]["documents"] == 3 and len(index["splits"]["train"]["shards"]) > 5
    assert index["dtype"] == "uint16" and index["max_id"] < tok.vocab_size
    batches = lambda tokens: [b["tokens"] for b in
                              iter_n(pipeline.train_dataset(tokens, seq_len=16, batch_size=2, seed=3), 5)]
    want_batches = batches(pipeline.pack(texts[0], tok, seed=None))
    assert all(np.array_equal(a, b) for a, b in zip(batches(train_tokens), want_batches))


def iter_n(dataset, n):
    it = iter(dataset)
    return [next(it) for _ in range(n)]


def test_prepared_caches_by_content_and_refuses_another_tokenizer(folder, tmp_path):
    first = store.prepared(str(folder / "flat"), ByteTokenizer(), log=lambda s: None)
    assert store.prepared(str(folder / "flat"), ByteTokenizer(), log=print) == first  # no second tokenization
    assert store.prepared(str(first), ByteTokenizer()) == first  # a store is used as it is
    with pytest.raises(corpus.CorpusError, match=r"was tokenized with byte .*this run uses .*prepare the store"):
        store.open_store(first, load_tokenizer(folder / "bpe"))
    with pytest.raises(FileExistsError, match="already exists"):
        store.prepare(folder / "flat", ByteTokenizer(), first)


def test_corpus_formats_train(folder, tmp_path):
    """A folder of a .parquet file and a .jsonl.gz file (texts in `body`) prepares and trains; a
    file of another kind is reported."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    root = tmp_path / "mixed"
    root.mkdir()
    pq.write_table(pa.table({"body": documents(rng, 30), "id": list(range(30))}), root / "a.parquet")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in documents(rng, 30))
    (root / "notes.md").write_text("not a document")
    seen = []
    docs = list(corpus.iter_documents(root, "body", seen.extend))
    assert len(docs) == 60 and seen == [root / "notes.md"]
    with pytest.raises(corpus.CorpusError, match=r"notes.md is none of .txt, .jsonl, .jsonl.gz, .parquet"):
        corpus.read_documents(root, "body")
    with pytest.raises(corpus.CorpusError, match=r"a.parquet has no column 'text' \(columns: body, id\)"):
        list(corpus.iter_documents(root / "a.parquet"))
    messages = []
    run = load_run_config("tiny", [f"data.corpus={root}", "data.text_field=body", "model.variant=lmm"] +
                          [f"train.{k}={v}" for k, v in FIELDS.items()])
    summary = train(run, tmp_path / "run", steps=2, progress=False, log=messages.append)
    assert summary["status"] == "done" and np.isfinite(summary["loss"])
    assert any("skipped 1 file(s) of no corpus format" in m for m in messages), messages


def test_vocab_size_auto_and_a_bpe_run_exported_with_its_tokenizer(folder, tmp_path):
    """`model.vocab_size: auto` takes the tokenizer's size rounded up to 128; the run folder and its
    export carry tokenizer.json, and both load into the same greedy generation."""
    from titans.sampling import generate

    settings = [f"data.corpus={folder / 'flat'}", f"data.tokenizer={folder / 'bpe'}", "model.vocab_size=auto",
                "model.variant=lmm"]
    run = load_run_config("tiny", settings + [f"train.{k}={v}" for k, v in FIELDS.items()])
    assert run.model.vocab_size == 384
    with pytest.raises(ConfigError, match="model.vocab_size: auto is resolved from the run's tokenizer"):
        titans.load_preset("tiny", vocab_size="auto")
    train(run, tmp_path / "run", steps=2, progress=False, log=lambda s: None)
    from tests.scripts import run_script

    code, _, err = run_script("export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "export"))
    assert code == 0, err
    assert (tmp_path / "run" / "tokenizer.json").is_file() and (tmp_path / "export" / "tokenizer.json").is_file()
    outputs = []
    for source in (tmp_path / "run", tmp_path / "export"):
        model, tok = titans.load(source)
        assert tok.vocab_size == 300 and tok.decode(tok.encode(TEXT)) == TEXT
        outputs.append(generate(model, tok.encode("the memory")[None], 6, jax.random.key(0), temperature=0.0))
    assert np.array_equal(*outputs)
    small = load_run_config("tiny", settings[:2] + ["model.vocab_size=260", "model.variant=lmm"])
    with pytest.raises(Exception, match=r"model.vocab_size=260 is smaller than the .* tokenizer's 300"):
        train(small, tmp_path / "never", steps=1, progress=False, log=lambda s: None)
    assert not (tmp_path / "never").exists()
