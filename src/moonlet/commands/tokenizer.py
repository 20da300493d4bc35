"""`moonlet tokenizer train`: a byte-level BPE (HF tokenizers) with moonlet's special tokens and chat template."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a tokenizer", description=__doc__)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE on text files or the bundled corpus",
                        description="Train a byte-level BPE with special tokens <|pad|> <|bos|> <|eos|> <|eot|> "
                                    "<|system|> <|user|> <|assistant|> (ids 0-6) and a chat template; digits are "
                                    "split one per token. Writes OUT/tokenizer.json + tokenizer_config.json.")
    t.add_argument("--data", nargs="+", metavar="PATH",
                   help="text/JSONL files or directories (default: the bundled corpus' training split)")
    t.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size incl. special tokens (default 4096)")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    t.add_argument("--out", "-o", required=True, metavar="DIR")
    t.set_defaults(func=run_train)
    s = tsub.add_parser("encode", help="show how a text tokenizes")
    s.add_argument("tokenizer", metavar="PATH", help="tokenizer.json or a directory holding one")
    s.add_argument("text")
    s.set_defaults(func=run_encode)


def run_train(args: argparse.Namespace) -> int:
    import time

    from ..data.corpus import bundled_documents, read_text_documents
    from ..data.tokenizer import train_tokenizer

    docs = read_text_documents(args.data) if args.data else bundled_documents("train")
    t = time.perf_counter()
    tok = train_tokenizer(docs, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    out = tok.save(args.out)
    n_chars = sum(map(len, docs))
    n_tok = sum(map(len, tok.encode_batch(docs[:50])))
    chars = sum(map(len, docs[:50]))
    print(f"trained a {tok.vocab_size}-token BPE on {n_chars / 1e6:.1f}M characters in {time.perf_counter() - t:.1f}s "
          f"({chars / max(1, n_tok):.2f} characters/token) -> {out}/tokenizer.json")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from ..data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    ids = tok.encode(args.text)
    print(f"{len(ids)} tokens: {ids}")
    print(" | ".join(tok.decode([i], skip_special=False) for i in ids))
    return 0
