"""The `mod-adapter` command.

Subcommands arrive with the features that need them; `info` describes an
adapter checkpoint, a concept file or a preset. User errors print one line
(`error: ...`) and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from . import __version__
from .modules.errors import ModAdapterError

EXIT_USER_ERROR = 2


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _file_format(path: str) -> str:
    """The `format` marker of a safetensors file of ours, checked safely."""
    from .modules.safetensors_io import read_safetensors_header

    metadata, _ = read_safetensors_header(path, kind="file", error_cls=ModAdapterError)
    marker = metadata.get("format")
    if marker not in ("mod-adapter", "mod-concept"):
        raise ModAdapterError(
            f"{path} is a safetensors file but not a Mod-Adapter checkpoint or concept file "
            f"(its metadata has format={marker!r}; expected 'mod-adapter' or 'mod-concept')"
        )
    return marker


def _info_for_file(path: str) -> Dict[str, Any]:
    if _file_format(path) == "mod-adapter":
        from .modules.checkpoint import read_adapter_info

        return {"kind": "adapter checkpoint", **read_adapter_info(path)}
    from .modules.concept_file import read_concept_info

    return {"kind": "concept file", **read_concept_info(path)}


def _info_for_preset(name: str) -> Dict[str, Any]:
    import torch

    from .modules.adapter import ModAdapter
    from .modules.config import ModAdapterConfig

    config = ModAdapterConfig.preset(name)
    with torch.device("meta"):  # count parameters without allocating them
        adapter = ModAdapter(config)
    params = adapter.num_parameters()
    return {"kind": "preset", "preset": name, "config": config.to_dict(), "parameter_count": params,
            "size_bf16": _human_bytes(2 * params), "size_fp32": _human_bytes(4 * params)}


def _print_info(info: Dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


def cmd_info(args: argparse.Namespace) -> int:
    if bool(args.file) == bool(args.preset):
        raise ModAdapterError("give either a file (adapter checkpoint or concept file) or --preset NAME")
    info = _info_for_file(args.file) if args.file else _info_for_preset(args.preset)
    _print_info(info, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mod-adapter",
        description="Mod-Adapter for FLUX.1: inspect adapter checkpoints and concept files "
                    "(training and concept learning commands come with later releases).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="describe an adapter checkpoint, a concept file, or a preset",
                          description="Print the metadata of a Mod-Adapter checkpoint or concept file (validated, "
                                      "without loading weights), or the size of a preset adapter.")
    info.add_argument("file", nargs="?", help="a .safetensors adapter checkpoint or concept file")
    info.add_argument("--preset", choices=["paper", "tiny"], help="describe a preset adapter instead of a file")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ModAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
