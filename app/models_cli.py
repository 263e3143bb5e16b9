"""`unsloth models list|import|pull`: the base models in `<data dir>/models`, which the API serves and fine-tunes
by name. `models_main(argv)` is what the `unsloth` command calls; it returns an exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from app.core.config import Settings, SettingsError, load_settings
from app.services import model_store
from app.services.model_store import DEFAULT_MODEL_NAME, ModelStoreError


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Manage the base models of the service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the installed base models (id, context length, size, path)")
    imp = sub.add_parser("import", help="install a GGUF file or a Hugging Face directory; with no PATH, the "
                                        "bundled SmolLM2-135M-Instruct")
    imp.add_argument("path", nargs="?", type=Path, help="a .gguf file or a Hugging Face model directory")
    imp.add_argument("--name", help="the model id (default: from the file or directory name)")
    imp.add_argument("--force", action="store_true", help="replace a model of the same name")
    pull = sub.add_parser("pull", help="download a model from the Hugging Face Hub (where it is reachable)")
    pull.add_argument("repo_id", help="e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
    pull.add_argument("--name", help="the model id (default: the repository id)")
    pull.add_argument("--revision", help="a branch, tag or commit")
    pull.add_argument("--force", action="store_true", help="replace a model of the same name")
    return parser


def models_main(argv: Sequence[str] | None = None, prog: str = "unsloth models") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        settings = load_settings()
        if args.command == "list":
            for m in model_store.list_models(settings):
                context = m.context_length or "?"
                print(f"{m.id}\tcontext {context}\t{m.bytes / 2**20:.0f} MB\t{m.path}")
            return 0
        if args.command == "pull":
            target = model_store.pull(settings, args.repo_id, args.name, args.revision, args.force)
        else:
            target = _import(settings, args.path, args.name, args.force)
    except (SettingsError, ModelStoreError) as e:
        print(f"unsloth: {e}", file=sys.stderr)
        return 2 if isinstance(e, SettingsError) else 1
    print(f"installed {target.relative_to(settings.models_dir)} at {target}")
    return 0


def _import(settings: Settings, path: Path | None, name: str | None, force: bool) -> Path:
    if path is None:
        return model_store.import_gguf_file(settings, model_store.default_gguf(), name or DEFAULT_MODEL_NAME, force)
    if path.is_dir():
        return model_store.import_hf_dir(settings, path, name or model_store.default_name(path.name), force)
    if path.suffix == ".gguf" and path.is_file():
        return model_store.import_gguf_file(settings, path, name or model_store.default_name(path.name), force)
    raise ModelStoreError(f"{path} is neither a .gguf file nor a Hugging Face model directory")


if __name__ == "__main__":
    raise SystemExit(models_main())
