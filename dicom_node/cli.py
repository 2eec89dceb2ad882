"""``dicom-node``: the only place that exits.

Subcommands: ``serve`` (the daemon), ``infer`` (the file-mode operator), ``triton`` (start a local Triton on the
model repository), ``status`` (series and jobs), ``retry`` (re-queue a job or a failed export).
Each subcommand loads the configuration once and hands typed objects to the module that does the work; errors
of the node's own kinds end in one line on stderr that names the object and the cause, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_node import __version__
from dicom_node.settings import ConfigError, Settings, load_settings

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _settings(path: Path | None) -> Settings:
    return load_settings(path)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.daemon import serve

    return serve(_settings(args.config))


def _cmd_infer(args: argparse.Namespace) -> int:
    from dicom_node.file_mode import run_file_mode

    if args.input is None or args.output is None:
        raise ConfigError("infer: --input and --output are required (or DICOM_NODE_INFER_INPUT/OUTPUT)")
    settings = _settings(args.settings)
    return run_file_mode(
        settings,
        input_dir=args.input,
        output_dir=args.output,
        publish_dir=args.publish,
        spec_path=args.config,
        backend=args.backend,
    )


def _cmd_triton(args: argparse.Namespace) -> int:
    from inference.triton_server import serve_forever

    settings = _settings(args.settings)
    repo = args.model_repository or settings.inference.model_repository
    return serve_forever(repo, settings.inference.triton)


def _cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.admin import print_status

    return print_status(_settings(args.config), as_json=args.json)


def _cmd_retry(args: argparse.Namespace) -> int:
    from dicom_node.admin import retry

    return retry(_settings(args.config), args.job)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="DICOM inference node: CT in over DIMSE, ground-glass opacity SEG out. Not for diagnostic use.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the DICOM node (C-STORE/C-ECHO SCP, jobs, export) in the foreground")
    p.add_argument("--config", type=Path, default=None, help="node.yaml (default: embedded defaults)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("infer", help="file mode: one volume in IN_DIR -> same-named .mhd mask in OUT_DIR")
    p.add_argument("--input", type=Path, default=_env_path("DICOM_NODE_INFER_INPUT"))
    p.add_argument("--output", type=Path, default=_env_path("DICOM_NODE_INFER_OUTPUT"))
    p.add_argument("--publish", type=Path, default=_env_path("DICOM_NODE_INFER_PUBLISH"))
    p.add_argument("--config", type=Path, default=None, help="config_inference.json (default: node.yaml's)")
    p.add_argument("--backend", choices=("triton", "onnxruntime"), default=None, help="default: node.yaml's")
    p.add_argument("--settings", type=Path, default=None, help="node.yaml for Triton and model repository settings")
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser("triton", help="start a local tritonserver on the model repository; stops on SIGTERM")
    p.add_argument("--model-repository", type=Path, default=None)
    p.add_argument("--settings", type=Path, default=None, help="node.yaml for ports and timeouts")
    p.set_defaults(func=_cmd_triton)

    p = sub.add_parser("status", help="list series, jobs and exports with their state and reason")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("retry", help="re-queue a failed job (and its failed exports)")
    p.add_argument("job", help="job id, as `status` prints it")
    p.add_argument("--config", type=Path, default=None)
    p.set_defaults(func=_cmd_retry)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dicom_node.errors import NodeError
    from inference.errors import InferenceError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (InferenceError, NodeError) as exc:
        print(f"dicom-node: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
