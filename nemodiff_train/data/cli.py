"""``nemodiff-data``: prepare pretraining or SFT data from the command line (argparse).

Examples::

    nemodiff-data pretrain --source web.jsonl:3 --source code/ --tokenizer ./tok \\
        --seq-len 256 --out data/pt [--val-source heldout.jsonl] [--num-proc 4] [--val-fraction 0.01]
    nemodiff-data sft --source chats.jsonl --tokenizer ./tok --seq-len 1024 --out data/sft [--no-pack] [--truncate]

A source is ``PATH[:WEIGHT]`` (file, directory, glob or Hub name) or
``path=NAME,config=...,split=...,weight=...,text_field=...,messages_field=...,name=...,streaming=true``.
``main`` returns the exit status (0 ok, 1 preparation error, 2 usage error) instead of exiting,
so ``nemodiff_train.cli.data`` can wrap it.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def _add_common(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument(
        "--source", action="append", required=True, metavar="SPEC",
        help="train source PATH[:WEIGHT] or key=value,... (repeatable; WEIGHT = relative share of tokens)",
    )
    p.add_argument("--val-source", action="append", default=[], metavar="SPEC",
                   help="val source (repeatable); if given, no documents are held out of the train sources")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory (or Hub name)")
    p.add_argument("--seq-len", type=int, required=True, help="row length L")
    p.add_argument("--out", required=True, help="output directory (built atomically)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents held out for val by content hash (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="blend/shuffle seed (default 0)")
    p.add_argument("--max-chars", type=int, default=1_000_000, help="skip rows with more characters (default 1e6)")
    p.add_argument("--max-documents", type=int, default=None, help="read at most N valid documents per source")
    p.add_argument("--max-bad-fraction", type=float, default=None,
                   help="fail when a source has more than this fraction of bad (skipped) rows (default: skip them)")
    if kind == "pretrain":
        p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    else:
        p.add_argument("--messages-field", default="messages", help="field holding the messages (default: messages)")
        p.add_argument("--no-pack", dest="pack", action="store_false",
                       help="one conversation per row (default: pack several per row)")
        p.add_argument("--truncate", action="store_true",
                       help="cut conversations longer than --seq-len instead of skipping them")
    p.add_argument("--quiet", action="store_true", help="print only errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemodiff-data",
        description="Tokenize and pack text or chat data into a prepared dataset directory.",
    )
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{pretrain,sft}")
    _add_common(sub.add_parser("pretrain", help="documents -> EOS-separated packed rows"), "pretrain")
    _add_common(sub.add_parser("sft", help="chat conversations -> rows with assistant-only loss"), "sft")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    from .format import DataFormatError
    from .prepare import DataPrepConfig, DataPrepError, prepare
    from .readers import SourceError
    from .sources import SourceSpec
    from .tokenizer import TokenizerError

    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = {"text_field": args.text_field} if args.kind == "pretrain" else {"messages_field": args.messages_field}
    try:
        sources = [SourceSpec.parse(s, **defaults) for s in args.source]
        val_sources = [SourceSpec.parse(s, **defaults) for s in args.val_source]
        cfg = DataPrepConfig(
            kind=args.kind,
            sources=sources,
            val_sources=val_sources,
            tokenizer=args.tokenizer,
            seq_len=args.seq_len,
            out=args.out,
            val_fraction=args.val_fraction,
            num_proc=args.num_proc,
            seed=args.seed,
            max_chars=args.max_chars,
            max_documents=args.max_documents,
            max_bad_fraction=args.max_bad_fraction,
            **({"pack": args.pack, "truncate": args.truncate} if args.kind == "sft" else {}),
        )
    except (ValueError, TypeError) as e:
        print(f"nemodiff-data: error: {e}", file=sys.stderr)
        return 2
    try:
        prepare(cfg, log=None if args.quiet else print)
    except (SourceError, TokenizerError, DataPrepError, DataFormatError, FileNotFoundError) as e:
        print(f"nemodiff-data: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m nemodiff_train.data.cli
    raise SystemExit(main())
